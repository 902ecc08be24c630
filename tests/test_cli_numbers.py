"""lowbit.cli_numbers: float options are finite and in range, refused by argparse in one line."""

from __future__ import annotations

import argparse

import pytest

from lowbit.cli_numbers import FRACTION, POSITIVE, FloatRange


@pytest.mark.parametrize("text", ["nan", "NaN", "inf", "-inf", "1e999", "-1e999"])
def test_non_finite_is_refused(text):
    with pytest.raises(argparse.ArgumentTypeError, match="is not a finite number; expected one in"):
        FloatRange()(text)


@pytest.mark.parametrize("kind,text,ok", [
    (POSITIVE, "0", False), (POSITIVE, "1e-9", True), (FRACTION, "0", True), (FRACTION, "1", True),
    (FRACTION, "1.0001", False), (FloatRange(0, 1, high_open=True), "1", False),
    (FloatRange(50, 100, low_open=True), "50", False), (FloatRange(50, 100, low_open=True), "100", True),
])
def test_range_ends(kind, text, ok):
    if ok:
        assert kind(text) == float(text)
    else:
        with pytest.raises(argparse.ArgumentTypeError, match=f"{text} is not in "):
            kind(text)


def test_the_range_reads_as_an_interval():
    assert str(POSITIVE) == "(0, inf)" and str(FloatRange(0, 1, high_open=True)) == "[0, 1)"
    assert str(FloatRange(high=2)) == "(-inf, 2]"
    with pytest.raises(argparse.ArgumentTypeError, match="'x' is not a number"):
        POSITIVE("x")


def test_every_float_option_of_the_cli_is_checked():
    from lowbit.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    plain = [f"{name} {a.option_strings[-1]}" for name, p in sub.choices.items() for a in p._actions if a.type is float]
    assert not plain, f"float options without a FloatRange: {plain}"

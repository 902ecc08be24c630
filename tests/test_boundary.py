"""``lowbit.boundary``: which failures are the user's (one line, exit 2), Ctrl-C (130), and bugs (traceback)."""

from __future__ import annotations

import errno
import json

import pytest
import yaml

from lowbit.boundary import EXIT_INTERRUPTED, EXIT_USER, OneLineParser, is_user_error, one_line, run_command
from lowbit.cli import print_json
from lowbit.scheme import QuantScheme


def _raise(e: BaseException):
    def command() -> int:
        raise e
    return command


def _raised_outside_lowbit(e: BaseException) -> BaseException:
    try:
        json.loads("{")  # a frame outside lowbit raises; the error is then swapped in with that traceback
    except ValueError as outer:
        return e.with_traceback(outer.__traceback__.tb_next)
    raise AssertionError


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device", "/x/model.safetensors"),
                                   PermissionError(errno.EACCES, "Permission denied"), yaml.YAMLError("bad"),
                                   UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), None])
def test_expected_failures_are_one_line_and_exit_2(error, capsys):
    command = _raise(error) if error is not None else lambda: QuantScheme(bits="four")  # lowbit's own refusal
    assert run_command(command, "quantize") == EXIT_USER
    err = capsys.readouterr().err
    assert err.startswith("lowbit quantize: error: ") and err.count("\n") == 1


def test_one_line_is_the_first_line():
    assert one_line(ValueError("the cause\n\nadvice after it")) == "the cause"
    assert one_line(ValueError()) == "ValueError"


def test_an_oserror_that_names_its_file_says_which():
    assert one_line(OSError(errno.ENOSPC, "No space left on device", "/x/m")) == "/x/m: No space left on device"


def test_ctrl_c_is_one_line_and_130(capsys):
    assert run_command(_raise(KeyboardInterrupt()), "eval") == EXIT_INTERRUPTED
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.parametrize("error", [KeyError("x"), AttributeError("x"), ZeroDivisionError()])
def test_a_bug_keeps_its_traceback(error):
    with pytest.raises(type(error)):
        run_command(_raise(error), "eval")


def test_a_value_error_raised_inside_another_library_is_a_bug():
    error = _raised_outside_lowbit(ValueError("deep inside a library"))
    assert not is_user_error(error)
    assert is_user_error(ValueError("raised here")) is False  # no traceback yet: raised nowhere
    try:
        raise ValueError("raised in lowbit's code")  # this test file is not lowbit's code either
    except ValueError as e:
        assert not is_user_error(e)


def test_a_usage_error_is_one_line_with_a_compact_usage(capsys):
    parser = OneLineParser(prog="lowbit quantize")
    parser.add_argument("model")
    parser.add_argument("-o", "--output", required=True)
    parser.add_argument("--bits", type=int)
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["m", "-o", "o", "--bits", "x"])
    assert exit_.value.code == EXIT_USER
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "usage: lowbit quantize MODEL -o OUTPUT [options]" in err


def test_json_output_is_strict(capsys):
    print_json({"ppl": float("nan"), "rows": [float("inf"), 1.5], "n": 3})
    assert json.loads(capsys.readouterr().out) == {"ppl": None, "rows": [None, 1.5], "n": 3}


def _screen(stream: str) -> list[str]:
    """What a terminal shows for ``stream``: per line, the text after its last carriage return once
    the blanks a cleared bar leaves are dropped (tqdm redraws a bar by returning to the line's start)."""
    return [line.split("\r")[-1].strip() or line.replace("\r", "").strip() for line in stream.split("\n")]


def _fails_half_way(bar_kind: str, failure: BaseException):
    """A command that draws a bar to stderr and fails at step 5: a bar it updates by hand (open when
    the failure reaches the boundary, its line unfinished) or a loop over one (which CPython closes,
    drawn a last time, as the exception leaves the loop)."""
    import sys

    from tqdm import tqdm

    def command(args) -> int:
        if bar_kind == "by hand":
            bar = tqdm(total=10, desc="quantize", file=sys.stderr, mininterval=0)
            for step in range(10):
                if step == 5:
                    raise failure
                bar.update()
        for step in tqdm(range(10), desc="quantize", file=sys.stderr, mininterval=0):
            if step == 5:
                raise failure
        return 0
    return command


@pytest.mark.parametrize("bar_kind", ["by hand", "loop"])
@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device", "/x/out"), KeyboardInterrupt()],
                         ids=["error", "ctrl-c"])
def test_a_failure_mid_progress_bar_is_the_last_line_on_a_line_of_its_own(failure, bar_kind, monkeypatch, capsys):
    """In-process through the CLI's entry function, without --quiet: the error line starts a line of
    its own and nothing is drawn after it; a bar still open is erased (before, the line was appended
    to it, and the bar was redrawn below it when collected)."""
    import gc

    from lowbit import cli

    monkeypatch.setattr(cli, "_run_pull", _fails_half_way(bar_kind, failure))
    rc = cli.main(["pull", "smollm2-135m"])
    gc.collect()  # where an abandoned bar used to be closed, and redrawn
    err = capsys.readouterr().err
    shown = [line for line in _screen(err) if line]
    assert rc == (EXIT_INTERRUPTED if isinstance(failure, KeyboardInterrupt) else EXIT_USER)
    assert shown[-1].startswith("lowbit pull: ") and "quantize" not in shown[-1], repr(err)
    assert "quantize" not in "".join(shown[:-1]) or bar_kind == "loop", f"a half-drawn bar is left: {err!r}"

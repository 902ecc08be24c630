"""Float command-line options, checked where argparse parses them: finite and in their range.

``float("nan")`` and ``float("inf")`` parse, and a range check written ``x < low`` lets NaN through
(every comparison with NaN is false): ``--lora-alpha nan`` trained a model of NaNs and
``--temperature nan`` sampled from NaN probabilities. Every float option of the CLI is declared
with a ``FloatRange`` as its ``type``, so a bad value is argparse's one-line usage error, naming
the option, before anything is loaded.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class FloatRange:
    """An argparse ``type`` for a float in ``[low, high]`` (None: unbounded on that side), an end
    left out when ``low_open`` / ``high_open``; NaN and infinities never pass.

    Raises (from ``__call__``):
        argparse.ArgumentTypeError: the text is not a number, not finite, or outside the range.
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __call__(self, text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number; expected one in {self}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text} is not a finite number; expected one in {self}")
        below = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        above = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if below or above:
            raise argparse.ArgumentTypeError(f"{text} is not in {self}")
        return value

    def __str__(self) -> str:
        low = "(-inf" if self.low is None else f"{'(' if self.low_open else '['}{self.low:g}"
        high = "inf)" if self.high is None else f"{self.high:g}{')' if self.high_open else ']'}"
        return f"{low}, {high}"


POSITIVE = FloatRange(low=0, low_open=True)
NON_NEGATIVE = FloatRange(low=0)
FRACTION = FloatRange(low=0, high=1)  # both ends included

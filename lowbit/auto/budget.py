"""Budgets: bits per weight of the allocated tensors, or bytes of the whole output file.

``--target-bpw 3.5`` counts the block linears as the README tables do (exact stored bits over
their weights); ``--target-size 90MiB`` counts the whole file, the tensors the allocator does not
choose for (norms, tokenizer, metadata) included. Either is an upper bound.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*$")


def parse_size(text: str) -> int:
    """Bytes that ``text`` names: ``"90MiB"``, ``"100.57 MiB"``, ``"94371840"``, ``"1.2GB"`` (rounded down).

    Raises:
        ValueError: not a non-negative number with one of ``SIZE_UNITS`` (case-insensitive).
    """
    match = _SIZE.match(str(text))
    if match is None:
        raise ValueError(f"size {text!r} is not a number with a unit, e.g. 90MiB or 94371840")
    unit = match.group(2).upper() or "B"
    if unit not in SIZE_UNITS:
        raise ValueError(f"unknown size unit {match.group(2)!r} in {text!r}; use B, KB, MB, GB, KiB, MiB or GiB")
    return math.floor(float(match.group(1)) * SIZE_UNITS[unit])


@dataclass(frozen=True)
class Budget:
    """One budget: ``bpw`` (bits per weight over the allocated tensors) or ``size_bytes`` (the whole
    file), exactly one of them."""

    bpw: float | None = None
    size_bytes: int | None = None

    def __post_init__(self) -> None:
        if (self.bpw is None) == (self.size_bytes is None):
            raise ValueError("a budget is bits per weight or a file size, exactly one of them")
        if self.bpw is not None and not (math.isfinite(self.bpw) and self.bpw > 0):
            raise ValueError(f"target bits per weight must be a positive number, got {self.bpw}")
        if self.size_bytes is not None and self.size_bytes <= 0:
            raise ValueError(f"target size must be positive, got {self.size_bytes} bytes")

    def describe(self) -> str:
        return f"{self.bpw:g} bits/weight" if self.bpw is not None else f"{self.size_bytes / 2**20:.2f} MiB"

    def to_dict(self) -> dict[str, float | int | None]:
        return {"bpw": self.bpw, "size_bytes": self.size_bytes}

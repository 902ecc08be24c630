"""Ternary codes: the grid {-1, 0, +1} (BitNet b1.58, TernaryLLM), stored in 2 bits per weight.

Code 0 is -1, code 1 is 0, code 2 is +1; code 3 never comes out of ``encode`` and decodes to +1, so
every byte of packed codes has a value. With a per-group scale ``s`` a weight is ``s * {-1, 0, 1}``.
"""

from __future__ import annotations

from torch import Tensor

from lowbit.formats.base import FormatName, register_format
from lowbit.formats.nf4 import LookupFormat


class TernaryFormat(LookupFormat):
    """``LookupFormat`` on (-1, 0, 1) with 2-bit codes."""

    def __init__(self) -> None:
        super().__init__(FormatName.TERNARY, (-1.0, 0.0, 1.0))

    def decode(self, codes: Tensor) -> Tensor:
        return self.table.to(codes.device)[codes.long().clamp(max=2)]


@register_format(FormatName.TERNARY)
def _ternary(bits: int, symmetric: bool) -> TernaryFormat:
    if bits != 2:
        raise ValueError(f"ternary codes take 2 bits, got bits={bits}; use --bits 2")
    if not symmetric:
        raise ValueError("ternary codes are symmetric around zero and have no zero-point; use --sym")
    return TernaryFormat()

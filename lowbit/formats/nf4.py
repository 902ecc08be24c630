"""NF4, the 4-bit NormalFloat of QLoRA (Dettmers et al. 2023, section 3 and appendix E).

Sixteen values: quantiles of a standard normal, normalised to [-1, 1], with an exact zero. The
table is the one the paper's code ships (bitsandbytes ``create_normal_map(offset=0.9677083)``);
``tests/formats/test_nf4.py`` re-derives it from the definition. Codes index the table, which is
sorted, so code 7 is zero and code 15 is +1.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowbit.formats.base import FormatName, NumberFormat, register_format

NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


class LookupFormat(NumberFormat):
    """A format given by a sorted table of values; encoding picks the nearest entry."""

    signed = True

    def __init__(self, name: FormatName, values: tuple[float, ...]) -> None:
        self.name = name  # type: ignore[misc]
        self.table = torch.tensor(values, dtype=torch.float32, device="cpu")  # cached: never on a default meta device
        self.bits = (len(values) - 1).bit_length()
        # Midpoints between neighbours: the decision boundaries of nearest rounding. A value on a
        # boundary goes to the upper neighbour (bucketize with right=False counts it as below).
        self._bounds = (self.table[1:] + self.table[:-1]) / 2

    @property
    def max_value(self) -> float:
        return float(self.table.abs().max())

    def encode(self, x: Tensor) -> Tensor:
        return torch.bucketize(x.float().contiguous(), self._bounds.to(x.device), right=True).to(torch.uint8)

    def decode(self, codes: Tensor) -> Tensor:
        return self.table.to(codes.device)[codes.long()]


@register_format(FormatName.NF4)
def _nf4(bits: int, symmetric: bool) -> LookupFormat:
    if bits != 4:
        raise ValueError(f"nf4 is a 4-bit format, got bits={bits}; use --bits 4")
    if not symmetric:
        raise ValueError("nf4 is a fixed table around zero and has no zero-point; use --sym (asymmetric is int only)")
    return LookupFormat(FormatName.NF4, NF4_VALUES)

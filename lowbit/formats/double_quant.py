"""Double quantization: quantize the quantization scales themselves (QLoRA, section 3).

First-level scales (one float per block of 64 weights, say) cost 32/64 = 0.5 bits per weight.
QLoRA stores them in 8 bits instead, in blocks of 256 with one float32 second-level scale each,
after subtracting their mean (scales are all positive, so centring doubles the resolution):
8/64 + 32/(64*256) = 0.127 bits per weight, for 4.127 bits with NF4 codes.

QLoRA's code uses bitsandbytes' 8-bit "dynamic" float map for the second level; lowbit uses
symmetric int8 (absmax / 127) on the centred scales, which is exact to within half a step of
1/254 of each block's range and needs no extra table. Blocks of 256 follow the paper.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lowbit.formats.integer import IntFormat

DQ_BLOCK = 256  # QLoRA section 3: second-level blocks of 256 scales
_INT8 = IntFormat(8, signed=True)


@dataclass
class DoubleQuantScales:
    """Scales ``s`` (``numel`` positive floats) stored as ``codes * block_scale + offset``.

    Fields:
        codes: uint8 ``[n_blocks * 256]`` offset-binary int8 codes (padding codes are zero).
        block_scale: float32 ``[n_blocks]``, the second-level scales.
        offset: float32 ``[1]``, the mean of the first-level scales.
        shape: shape of the scale tensor this represents.
    """

    codes: Tensor
    block_scale: Tensor
    offset: Tensor
    shape: tuple[int, ...]

    @classmethod
    def from_scales(cls, scales: Tensor) -> DoubleQuantScales:
        s = scales.float().flatten()
        offset = s.mean().reshape(1)
        centred = torch.nn.functional.pad(s - offset, (0, -s.numel() % DQ_BLOCK)).reshape(-1, DQ_BLOCK)
        block_scale = centred.abs().amax(dim=1) / _INT8.max_value
        safe = torch.where(block_scale > 0, block_scale, torch.ones_like(block_scale))
        codes = _INT8.encode(centred / safe[:, None])
        return cls(codes.flatten(), block_scale, offset, tuple(scales.shape))

    def dequantize(self) -> Tensor:
        n = 1
        for d in self.shape:
            n *= d
        values = _INT8.decode(self.codes).reshape(-1, DQ_BLOCK) * self.block_scale[:, None]
        return (values.flatten()[:n] + self.offset).reshape(self.shape)

    def storage_bits(self) -> int:
        """Bits stored for these scales: codes, block scales and the offset."""
        return self.codes.numel() * 8 + (self.block_scale.numel() + self.offset.numel()) * 32

"""Uniform integer grids, 2 to 8 bits, signed (for symmetric schemes) or unsigned (asymmetric).

The affine scheme of the seeds, ``q = clamp(round(w / s + z))`` and ``w' = s (q - z)``, uses the
unsigned grid ``[0, 2**bits - 1]``; a symmetric scheme uses the signed grid
``[-2**(bits-1), 2**(bits-1) - 1]`` with ``z = 0``. Codes are always unsigned: a signed value ``q`` is
stored as ``q + 2**(bits-1)`` (offset binary), so packing never has to deal with sign bits.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowbit.formats.base import FormatName, NumberFormat, register_format

MIN_BITS, MAX_BITS = 2, 8


class IntFormat(NumberFormat):
    """Integers on ``bits`` bits; rounding is round-half-to-even (``torch.round``)."""

    name = FormatName.INT

    def __init__(self, bits: int, signed: bool) -> None:
        if not MIN_BITS <= bits <= MAX_BITS:
            raise ValueError(f"int format supports {MIN_BITS} to {MAX_BITS} bits, got bits={bits}")
        self.bits = bits
        self.signed = signed
        self.offset = 2 ** (bits - 1) if signed else 0
        self.qmin = -self.offset
        self.qmax = 2**bits - 1 - self.offset

    @property
    def max_value(self) -> float:
        # Symmetric scales map absmax onto 2**(b-1) - 1, leaving -2**(b-1) for values a clipping
        # observer pushes past the range; asymmetric scales map max - min onto 2**b - 1.
        return float(self.qmax)

    @property
    def min_value(self) -> float:
        return float(self.qmin)

    @property
    def absmax_level(self) -> float:
        """Half the grid's span, ``(qmax - qmin) / 2`` (7.5 for int4), for the signed grid.

        The signed grid has one more negative level than positive ones (-8..7). Mapping the
        largest magnitude to 7.5 rather than 7, as GPTQ's reference quantizer (``scale =
        2 amax / (2**bits - 1)``, zero at the middle code), llm-compressor and GPTQModel do, uses
        all 16 levels: the step is 7% finer, the negative extreme lands on -8 exactly and the
        positive one rounds to 7 (an error of half a step). On SmolLM2 int4 per channel this
        grid is what separated lowbit's GPTQ from both peers'.
        """
        return (self.qmax - self.qmin) / 2 if self.signed else float(self.qmax)

    def encode(self, x: Tensor) -> Tensor:
        q = torch.round(x.float()).clamp_(self.qmin, self.qmax)
        return (q + self.offset).to(torch.uint8)

    def decode(self, codes: Tensor) -> Tensor:
        return codes.to(torch.float32) - self.offset


@register_format(FormatName.INT)
def _int_format(bits: int, symmetric: bool) -> IntFormat:
    return IntFormat(bits, signed=symmetric)

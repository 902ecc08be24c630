"""Minifloats: FP8 E4M3 and E5M2 (OCP FP8 spec) and FP4 E2M1 (OCP Microscaling spec).

One generic encoder covers all three: round to nearest, ties to even, on the grid of
``2**(e - mbits)``-spaced values of each binade, with subnormals below ``2**(1 - bias)``. Overflow
follows ``torch``'s casts so that codes are bit-identical to ``x.to(torch.float8_*)``:
E4M3FN has no infinity and saturates to +-448 (inf too); E5M2 overflows to +-inf; FP4 has neither
inf nor NaN and saturates to +-6. Quantizers clamp to ``max_value`` before encoding anyway.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lowbit.formats.base import FormatName, NumberFormat, register_format


@dataclass(frozen=True)
class MinifloatSpec:
    """Bit layout ``sign | exponent (ebits) | mantissa (mbits)`` and special-value rules."""

    ebits: int
    mbits: int
    bias: int
    max_value: float
    has_inf: bool  # IEEE-style: all-ones exponent with zero mantissa is inf (E5M2)
    nan_codes: tuple[int, ...]  # positive-sign NaN codes; the negative ones add the sign bit


E4M3 = MinifloatSpec(ebits=4, mbits=3, bias=7, max_value=448.0, has_inf=False, nan_codes=(0x7F,))
E5M2 = MinifloatSpec(ebits=5, mbits=2, bias=15, max_value=57344.0, has_inf=True, nan_codes=(0x7D, 0x7E, 0x7F))
E2M1 = MinifloatSpec(ebits=2, mbits=1, bias=1, max_value=6.0, has_inf=False, nan_codes=())


class MinifloatFormat(NumberFormat):
    signed = True

    def __init__(self, name: FormatName, spec: MinifloatSpec) -> None:
        self.name = name  # type: ignore[misc]  # instances differ only by spec
        self.spec = spec
        self.bits = 1 + spec.ebits + spec.mbits
        self._table = self._decode_table()

    @property
    def max_value(self) -> float:
        return self.spec.max_value

    def _decode_table(self) -> Tensor:
        """Value of every code, from the bit layout (the spec's definition, not a cast)."""
        s = self.spec
        values = []
        for code in range(2**self.bits):
            sign = -1.0 if code >> (self.bits - 1) else 1.0
            exp = (code >> s.mbits) & ((1 << s.ebits) - 1)
            mant = code & ((1 << s.mbits) - 1)
            magnitude_code = code & ((1 << (self.bits - 1)) - 1)
            if magnitude_code in s.nan_codes:
                values.append(float("nan"))
            elif s.has_inf and exp == (1 << s.ebits) - 1 and mant == 0:
                values.append(sign * float("inf"))
            elif exp == 0:
                values.append(sign * mant * 2.0 ** (1 - s.bias - s.mbits))
            else:
                values.append(sign * (1 + mant / 2**s.mbits) * 2.0 ** (exp - s.bias))
        return torch.tensor(values, dtype=torch.float32, device="cpu")  # cached: never on a default meta device

    def encode(self, x: Tensor) -> Tensor:
        s = self.spec
        x = x.float()
        a = x.abs()
        emin = 1 - s.bias
        # Exponent of each value's binade, never below the subnormal binade.
        _, e = torch.frexp(a)
        e = (e - 1).clamp_(min=emin)
        quantum = torch.ldexp(torch.ones_like(a), e - s.mbits)
        q = torch.round(a / quantum) * quantum  # exact: quantum is a power of two; ties to even
        overflow = q > s.max_value
        q = torch.where(overflow, torch.full_like(q, s.max_value), q)
        # Magnitude code from the rounded value: normal if q >= 2**emin, else subnormal.
        _, qe = torch.frexp(q)
        normal = q >= 2.0**emin
        exp_field = torch.where(normal, qe - 1 + s.bias, torch.zeros_like(qe))
        mant_scale = torch.where(normal, torch.ldexp(torch.ones_like(q), s.mbits - (qe - 1)),
                                 torch.full_like(q, 2.0 ** (s.mbits - emin)))
        mant = torch.where(normal, q * mant_scale - 2**s.mbits, q * mant_scale)
        code = (exp_field << s.mbits) + mant.to(torch.int32)
        if s.has_inf:
            inf_code = ((1 << s.ebits) - 1) << s.mbits
            code = torch.where(overflow | torch.isinf(a), torch.full_like(code, inf_code), code)
        if s.nan_codes:
            code = torch.where(torch.isnan(x), torch.full_like(code, s.nan_codes[-1]), code)
        sign = torch.signbit(x).to(torch.int32) << (self.bits - 1)
        return (code | sign).to(torch.uint8)

    def decode(self, codes: Tensor) -> Tensor:
        return self._table.to(codes.device)[codes.long()]


@register_format(FormatName.FP8_E4M3)
def _fp8_e4m3(bits: int, symmetric: bool) -> MinifloatFormat:
    _check(FormatName.FP8_E4M3, 8, bits, symmetric)
    return MinifloatFormat(FormatName.FP8_E4M3, E4M3)


@register_format(FormatName.FP8_E5M2)
def _fp8_e5m2(bits: int, symmetric: bool) -> MinifloatFormat:
    _check(FormatName.FP8_E5M2, 8, bits, symmetric)
    return MinifloatFormat(FormatName.FP8_E5M2, E5M2)


@register_format(FormatName.FP4)
def _fp4(bits: int, symmetric: bool) -> MinifloatFormat:
    _check(FormatName.FP4, 4, bits, symmetric)
    return MinifloatFormat(FormatName.FP4, E2M1)


def _check(name: FormatName, fixed_bits: int, bits: int, symmetric: bool) -> None:
    """Reject combinations a fixed-width float format does not have, naming what it does have."""
    if bits != fixed_bits:
        raise ValueError(f"{name.value} is a {fixed_bits}-bit format, got bits={bits}; use --bits {fixed_bits}")
    if not symmetric:
        raise ValueError(f"{name.value} is sign-magnitude and has no zero-point; use --sym (asymmetric is int only)")

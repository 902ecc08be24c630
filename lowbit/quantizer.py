"""The affine maths shared by every method: rows, ranges -> scales and zero-points -> codes.

Every granularity is handled as "rows that each get one scale": a weight ``[out, in]`` becomes
``[1, out*in]`` per tensor, ``[out, in]`` per channel and ``[out*G, g]`` per group of ``g``. Methods
and observers then work on rows and never branch on granularity.

Formulas (the seeds' affine scheme), with ``s`` the scale and ``b`` the bits:
- symmetric:       ``s = max(|lo|, hi) / absmax_level``, ``q = enc(w / s)``,    ``w' = s dec(q)``
  (``absmax_level`` is the format's largest value, or 7.5 for the -8..7 int4 grid: see ``IntFormat``)
- asymmetric int:  ``s = (hi - lo) / (2**b - 1)``, ``z = round(-lo / s)``, ``q = enc(w / s + z)``, ``w' = s (q - z)``
- asymmetric float: same ``s``, ``m = lo``,              ``q = enc((w - m) / s)``, ``w' = s q + m``
Scales and float minimums are rounded to float16, the precision they are stored in, *before* the
codes are chosen, so the stored codes are optimal for the stored scales.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowbit.formats import NumberFormat
from lowbit.scheme import Granularity, QuantScheme, ZeroPoint

# Smallest positive float16 (subnormal): a scale below it would be stored as zero.
MIN_SCALE = 2.0**-24


def rows_shape(shape: tuple[int, int], scheme: QuantScheme, layer: str = "weight") -> tuple[int, int]:
    """(R, G): the scale grid of a weight of ``shape``; rows of length ``out*in / (R*G)``."""
    out_features, in_features = shape
    if scheme.granularity is Granularity.TENSOR:
        return 1, 1
    return out_features, in_features // scheme.group_length(in_features, layer)


def weight_rows(weight: Tensor, scheme: QuantScheme, layer: str = "weight") -> Tensor:
    """View ``weight [out, in]`` as float32 rows ``[R*G, n]`` that each share one scale."""
    R, G = rows_shape(tuple(weight.shape), scheme, layer)
    return weight.float().reshape(R * G, -1)


def qparams(lo: Tensor, hi: Tensor, fmt: NumberFormat, scheme: QuantScheme) -> tuple[Tensor, Tensor | None]:
    """Scale and zero-point (None when symmetric) per row from the row's clipping range."""
    if scheme.symmetric:
        amax = torch.maximum(lo.abs(), hi.abs())
        return _to_stored(amax / fmt.absmax_level), None
    levels = 2**scheme.bits - 1
    scale = _to_stored((hi - lo) / levels)
    if scheme.zero_point is ZeroPoint.INT:
        return scale, torch.round(-lo / scale).clamp_(0, levels)
    return scale, lo.half().float()


def quantize_rows(x: Tensor, scale: Tensor, zero: Tensor | None, fmt: NumberFormat, scheme: QuantScheme) -> Tensor:
    """Codes (uint8 ``[rows, n]``) of float rows ``x`` under per-row ``scale`` and ``zero``."""
    s = scale[:, None]
    if zero is None:
        return fmt.encode(x / s)
    if scheme.zero_point is ZeroPoint.INT:
        return fmt.encode(x / s + zero[:, None])
    return fmt.encode((x - zero[:, None]) / s)


def dequantize_rows(codes: Tensor, scale: Tensor, zero: Tensor | None, fmt: NumberFormat,
                    scheme: QuantScheme) -> Tensor:
    """Float32 values of ``codes [rows, n]``: the inverse map of ``quantize_rows``."""
    return dequantize_values(fmt.decode(codes), scale, zero, scheme)


def dequantize_values(v: Tensor, scale: Tensor, zero: Tensor | None, scheme: QuantScheme) -> Tensor:
    """Apply per-row ``scale`` and ``zero`` to already decoded grid values ``v [rows, n]``."""
    s = scale[:, None]
    if zero is None:
        return v * s
    if scheme.zero_point is ZeroPoint.INT:
        return (v - zero[:, None]) * s
    return v * s + zero[:, None]


def fake_quantizer(fmt: NumberFormat, scheme: QuantScheme):
    """``fake_quant(x, lo, hi)`` for observers: quantize-dequantize rows with a candidate range."""

    def fake_quant(x: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
        scale, zero = qparams(lo, hi, fmt, scheme)
        return dequantize_rows(quantize_rows(x, scale, zero, fmt, scheme), scale, zero, fmt, scheme)

    return fake_quant


def _to_stored(scale: Tensor) -> Tensor:
    """Round scales to float16 as stored, never to zero (an all-zero row gets the tiniest scale)."""
    return scale.clamp(min=MIN_SCALE, max=65504.0).half().float()

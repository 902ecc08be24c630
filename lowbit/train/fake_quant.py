"""Fake quantization: the float value a ``QuantizedWeight`` would hold, with straight-through gradients.

Quantization-aware training runs the model on ``dequantize(quantize(w))`` and needs gradients through
the rounding, which has none. This module computes that value *bit for bit* as the storage encoder
and ``QuantizedWeight.dequantize`` would (same divisions, same ``encode``/``decode`` of the number
format, same float16 rounding of scales), and attaches the straight-through estimator's gradient:

- weights (STE, Bengio et al. 2013): the identity inside the grid's range ``[lo, hi]`` (in units of
  the scale), zero outside it (the clamp cuts them off);
- step sizes (LSQ, Esser et al. 2020, eq. 3): ``dw'/ds = q - w/s`` inside the range, ``q`` (the clip
  level) outside, times LSQ's gradient scale ``1 / sqrt(n * Q_p)`` (``n`` weights share a scale);
- zero-points (LSQ+, Bhalgat et al. 2020): integer zero-points are rounded with an STE, float
  minimums rounded to their float16 storage with an identity gradient;
- codebooks (``lut``, ``vq``): the nearest entry is a fixed choice, the entries get the gather's
  gradient (what a k-means centroid update follows) and the weight an identity;
- W8A8 activations (``fake_quantize_activation``): the input with the same STE, a static
  ``input_scale`` with LSQ's step-size gradient (``n`` = the input's elements), a dynamic scale
  recomputed from each input as the 8-bit layer does (no gradient: it is not a parameter).

The exact value and the surrogate that carries the gradient are computed apart and joined by
``straight_through``, whose forward returns the exact tensor unchanged: no ``x + (q - x).detach()``,
which is off by one rounding. The storage encoder (``lowbit.quantizer``, ``lowbit.methods``) is not
touched: ``FakeQuantParams.to_quantized`` builds the stored tensors from the codes used here.

Schemes refused (``check_trainable``): two-level scales (llama.cpp K types), GPTQ's ``g_idx``
layout and a sparse part; they have no trainer yet.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lowbit.act_scheme import ActScheme, dynamic_scale
from lowbit.formats import DoubleQuantScales, NumberFormat, pack
from lowbit.formats.codebook import lookup, nearest_codes
from lowbit.qweight import QuantizedWeight, WeightLayout
from lowbit.quantizer import MIN_SCALE, dequantize_values
from lowbit.scheme import QuantScheme, ZeroPoint

FP16_MAX = 65504.0


class _StraightThrough(torch.autograd.Function):
    """Forward: ``exact``; backward: the gradient goes to ``surrogate`` (same shape)."""

    @staticmethod
    def forward(ctx, exact: Tensor, surrogate: Tensor) -> Tensor:  # type: ignore[override]
        return exact.detach().clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, Tensor]:  # type: ignore[override]
        return None, grad


def straight_through(exact: Tensor, surrogate: Tensor) -> Tensor:
    """``exact``'s value with ``surrogate``'s gradient."""
    return _StraightThrough.apply(exact, surrogate)


class _GradScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, factor: float) -> Tensor:  # type: ignore[override]
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad * ctx.factor, None


def grad_scale(x: Tensor, factor: float) -> Tensor:
    """``x`` unchanged, its gradient times ``factor`` (LSQ's step-size gradient scale)."""
    return _GradScale.apply(x, factor)


def stored_scale(scale: Tensor) -> Tensor:
    """Scales as float16 stores them (``lowbit.quantizer._to_stored``), identity gradient."""
    return straight_through(scale.detach().clamp(MIN_SCALE, FP16_MAX).half().float(), scale)


def check_trainable(scheme: QuantScheme) -> None:
    """Refuse a scheme the trainer cannot fake-quantize, in one line.

    Raises:
        ValueError: two-level scales, a group index, a sparse part or float32 scales.
    """
    if scheme.super_group is not None or scheme.group_index or scheme.sparse or scheme.float32_scales:
        raise ValueError(f"quantization-aware training cannot fake-quantize {scheme.describe()} yet (two-level "
                         "scales, g_idx, sparse outliers and float32 scales have no trainer); quantize with plain "
                         "groups (no --super-group / act-order g_idx / --outliers)")


def grid_range(fmt: NumberFormat) -> tuple[float, float]:
    """The grid's smallest and largest value: where the STE cuts the weight's gradient off."""
    return fmt.min_value, fmt.max_value


@dataclass
class FakeQuantParams:
    """What decodes a weight's codes, as float32 tensors a trainer may learn.

    Fields (``R, G = rows_shape``; rows of the weight are ``[R*G, n]``):
        scale: ``[R, G]`` step sizes (grid schemes; None for codebooks).
        zero: ``[R, G]`` integer zero-points (held as floats, rounded in the forward) or float
            minimums; None when symmetric.
        codebook: ``[R*G, K]`` or ``[R*G, K, d]`` (``lut``/``vq``), else None.
    """

    scale: Tensor | None = None
    zero: Tensor | None = None
    codebook: Tensor | None = None

    @classmethod
    def from_quantized(cls, qweight: QuantizedWeight) -> FakeQuantParams:
        """The decoding parameters of a stored weight (scales decoded from their 8-bit form where
        double-quantized), so training starts exactly at the PTQ result."""
        check_trainable(qweight.scheme)
        if qweight.scheme.is_codebook:
            return cls(codebook=qweight.codebook.float().clone())
        zero = qweight.zeros()
        return cls(scale=qweight.scales().clone(), zero=None if zero is None else zero.clone())


def fake_quantize(weight: Tensor, params: FakeQuantParams, scheme: QuantScheme,
                  codes: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(w', codes)``: the fake-quantized weight ``[out, in]`` and the uint8 codes it used
    (``[R*G, n]``, or ``[R*G, n / d]`` for vq).

    ``codes`` given: they are kept (EfficientQAT's E2E-QP trains step sizes over fixed codes) and
    ``weight`` only gives the shape. ``w'`` equals ``to_quantized(...).dequantize()`` bit for bit.
    """
    if scheme.is_codebook:
        return _fake_codebook(weight, params, scheme, codes)
    return _fake_grid(weight, params, scheme, codes)


def _decoding_scale(params: FakeQuantParams, scheme: QuantScheme, n: int, fmt: NumberFormat) -> Tensor:
    """Per-row scales ``[R*G]`` in their stored precision, with LSQ's gradient scale."""
    qp = fmt.max_value
    s = grad_scale(params.scale, 1.0 / math.sqrt(n * qp))
    if scheme.double_quant:
        exact = DoubleQuantScales.from_scales(s.detach()).dequantize()
        return straight_through(exact, s).reshape(-1)
    return stored_scale(s).reshape(-1)


def _decoding_zero(params: FakeQuantParams, scheme: QuantScheme) -> Tensor | None:
    if params.zero is None:
        return None
    z = params.zero.reshape(-1)
    if scheme.zero_point is ZeroPoint.INT:
        levels = 2**scheme.bits - 1
        return straight_through(torch.round(z.detach()).clamp(0, levels), z)
    return straight_through(z.detach().half().float(), z)


def _fake_grid(weight: Tensor, params: FakeQuantParams, scheme: QuantScheme,
               codes: Tensor | None) -> tuple[Tensor, Tensor]:
    fmt = scheme.number_format()
    R, G = params.scale.shape
    W = weight.float().reshape(R * G, -1)
    s = _decoding_scale(params, scheme, W.shape[1], fmt)
    z = _decoding_zero(params, scheme)
    lo, hi = grid_range(fmt)
    if codes is None:
        x = _to_grid_units(W, s, z, scheme)
        codes = fmt.encode(x.detach().clamp(lo, hi))
        values = fmt.decode(codes)
        xc = x.clamp(lo, hi)
        surrogate_values = xc + (values - xc).detach()
    else:
        values = fmt.decode(codes)
        surrogate_values = values
    exact = dequantize_values(values, s.detach(), None if z is None else z.detach(), scheme)
    surrogate = dequantize_values(surrogate_values, s, z, scheme)
    return straight_through(exact, surrogate).reshape(weight.shape), codes


def _to_grid_units(W: Tensor, s: Tensor, z: Tensor | None, scheme: QuantScheme) -> Tensor:
    """The same arithmetic as ``lowbit.quantizer.quantize_rows`` before ``encode``."""
    if z is None:
        return W / s[:, None]
    if scheme.zero_point is ZeroPoint.INT:
        return W / s[:, None] + z[:, None]
    return (W - z[:, None]) / s[:, None]


def _fake_codebook(weight: Tensor, params: FakeQuantParams, scheme: QuantScheme,
                   codes: Tensor | None) -> tuple[Tensor, Tensor]:
    cb = params.codebook
    W = weight.float().reshape(cb.shape[0], -1)
    cb16 = straight_through(cb.detach().half().float(), cb)
    if codes is None:
        codes = nearest_codes(W.detach(), cb16.detach())
    exact = lookup(codes, cb16.detach())
    surrogate = lookup(codes, cb16) + (W - W.detach())
    return straight_through(exact, surrogate).reshape(weight.shape), codes


def fake_quantize_activation(x: Tensor, act: ActScheme, input_scale: Tensor | None = None) -> Tensor:
    """``x [..., K]`` as the W8A8 layer's 8-bit operand decodes it: ``encode(x / s) * s`` with the
    scale ``quantize_activation`` uses (``input_scale`` when static, else per token or per input),
    same codes bit for bit; straight-through gradients for ``x`` and LSQ's for a static scale."""
    flat = x.float().reshape(-1, x.shape[-1])
    lo, hi = act.code_range
    if act.dynamic:
        s = dynamic_scale(flat.detach(), act)
    else:
        if input_scale is None:
            raise ValueError("a static activation scheme needs its input_scale")
        s = grad_scale(input_scale.clamp(min=MIN_SCALE), 1.0 / math.sqrt(flat.numel() * act.max_level)).reshape(1, 1)
    y = flat / s
    q = act.encode(y.detach().clone()).float()
    yc = y.clamp(lo, hi)
    surrogate = (yc + (q - yc).detach()) * s
    return straight_through(q * s.detach(), surrogate).reshape(x.shape).to(x.dtype)


@torch.no_grad()
def to_quantized(weight: Tensor, params: FakeQuantParams, scheme: QuantScheme,
                 codes: Tensor | None = None) -> QuantizedWeight:
    """The ``QuantizedWeight`` whose ``dequantize()`` is ``fake_quantize(weight, params, scheme, codes)[0]``:
    its codes are the codes that forward used, its scales the stored form that forward rounded to."""
    shape = tuple(weight.shape)
    _, codes = fake_quantize(weight, params, scheme, codes)
    packed = pack(codes.reshape(shape[0], -1), scheme.bits)
    if scheme.is_codebook:
        return QuantizedWeight.from_tensors(scheme, shape, {"qdata": packed, "codebook": params.codebook.half()})
    R, G = WeightLayout(scheme, shape).rows
    data = {"qdata": packed}
    if scheme.double_quant:
        dq = DoubleQuantScales.from_scales(params.scale)
        data.update(scale_codes=dq.codes, scale_block_scale=dq.block_scale, scale_offset=dq.offset)
    else:
        data["scale"] = params.scale.clamp(MIN_SCALE, FP16_MAX).half()
    if params.zero is not None:
        if scheme.zero_point is ZeroPoint.INT:
            z = torch.round(params.zero).clamp(0, 2**scheme.bits - 1).to(torch.uint8)
            data["zero"] = pack(z.reshape(R, G), scheme.bits)
        else:
            data["zero"] = params.zero.half().reshape(R, G)
    return QuantizedWeight.from_tensors(scheme, shape, data)

"""AWQ: activation-aware weight quantization, with the layer-output error measured through the Hessian.

Lin, Tang, Tang, Yang, Dang, Gan, Han, "AWQ: Activation-aware Weight Quantization for LLM
Compression and Acceleration" (MLSys 2024). Two searches per block of a model:

1. **Scales.** Input channels that see large activations matter most; scaling them up by ``s``
   before quantization (and the activations down by ``s``, folded into the op that feeds the
   layer) protects them. ``s = mean|x|^a / mean|w|^(1-a)`` (AutoAWQ's ``duo_scaling``; with
   ``duo_scaling=False`` the paper's ``mean|x|^a``), normalised to geometric mean 1, with ``a``
   chosen on a grid of ``config.grid`` points in [0, 1).
2. **Clipping.** Each row (group) of the scaled weight gets its range shrunk by the factor in
   ``{1, 1 - 1/clip_grid, ...}`` (down to ``1 - max_shrink``) that minimises the error of its
   output.

Both searches minimise the paper's objective, the error of the layer's output on the calibration
inputs, ``||Q(W diag s) diag(s)^-1 X - W X||^2``. AutoAWQ estimates it by running the block's
module on (a subsample of) the calibration tokens for each candidate; here it is computed exactly
for all tokens from the Hessian ``H = 2 X^T X / n`` the pipeline collects anyway:
``err(dW) = sum((dW @ H) * dW)``. One candidate then costs a ``[out, in] x [in, in]`` product,
independent of the number of calibration tokens. Clipping uses each group's diagonal block of
``H`` (the cross-group terms are ignored, as AutoAWQ's per-group search does).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lowbit.methods.registry import InputStatistics, Statistic, per_weight, register_method
from lowbit.methods.transforms import ChannelScales, TransformKind, register_transform
from lowbit.methods.rtn import check_finite, row_params, rtn_params, weight_from_rows
from lowbit.observers import observe_range
from lowbit.quantizer import dequantize_rows, fake_quantizer, qparams, quantize_rows, rows_shape, weight_rows
from lowbit.qweight import QuantizedWeight
from lowbit.scheme import QuantScheme


@dataclass(frozen=True)
class AWQConfig:
    """The knobs of the two searches; defaults are AutoAWQ's (``n_grid=20``, ``max_shrink=0.5``).

    The scale search (transform ``awq``) reads ``grid`` and ``duo_scaling``, the clipping search
    (method ``awq``) the ``clip`` fields."""

    grid: int = 20  # exponents a in {0, 1/grid, ..., (grid-1)/grid}
    duo_scaling: bool = True  # s = mean|x|^a / mean|w|^(1-a); False: s = mean|x|^a
    clip: bool = True  # search each row's clipping range
    clip_grid: int = 20  # shrink factors 1 - i/clip_grid
    max_shrink: float = 0.5  # smallest factor tried: 1 - max_shrink

    def __post_init__(self) -> None:
        if not (isinstance(self.grid, int) and self.grid >= 1):
            raise ValueError(f"AWQ grid must be an int >= 1 (e.g. 20), got {self.grid!r}")
        if not (isinstance(self.clip_grid, int) and self.clip_grid >= 1):
            raise ValueError(f"AWQ clip_grid must be an int >= 1 (e.g. 20), got {self.clip_grid!r}")
        if not 0.0 <= self.max_shrink < 1.0:
            raise ValueError(f"AWQ max_shrink must be in [0, 1), got {self.max_shrink!r}")


def output_error(delta: Tensor, H: Tensor) -> Tensor:
    """``sum((delta @ H) * delta, dim=1)``: each row's output error for a weight change ``delta [out, in]``."""
    return ((delta @ H) * delta).sum(dim=1)


def fake_quantize(weight: Tensor, scheme: QuantScheme) -> Tensor:
    """Round-to-nearest quantize-dequantize of ``weight [out, in]`` (float32, same shape).

    The searches call this for every candidate, so unlike ``rtn_params`` it does not re-check the
    weight for NaN/Inf (``search_scales`` checks once).
    """
    fmt = scheme.number_format()
    rows = weight_rows(weight, scheme)
    scale, zero = row_params(rows, scheme)
    return dequantize_rows(quantize_rows(rows, scale, zero, fmt, scheme), scale, zero, fmt, scheme).reshape(weight.shape)


@dataclass(frozen=True)
class ScaleSearch:
    """What ``search_scales`` found: the scale (all ones when no exponent beat unscaled RTN), the
    exponent chosen (None for unscaled) and the output error before and after."""

    scale: Tensor
    exponent: float | None
    error_unscaled: float
    error: float


@torch.no_grad()
def search_scales(weights: Sequence[Tensor], H: Tensor, x_absmean: Tensor, scheme: QuantScheme,
                  config: AWQConfig = AWQConfig()) -> ScaleSearch:
    """The per-input-channel scale for linears that read the same input (q/k/v, gate/up).

    Args:
        weights: ``[out_k, in]`` float weights of the linears, unscaled.
        H: ``2 X^T X / n`` of their shared input, ``[in, in]``.
        x_absmean: mean ``|x|`` per input channel over the calibration tokens, ``[in]``.
        scheme: how the weights will be quantized (RTN is the proxy quantizer, as in AWQ).

    Unscaled RTN is always a candidate, so the result never has a larger proxy error than no
    scaling. Deterministic: ties keep the earlier candidate.
    """
    for i, w in enumerate(weights):
        check_finite(w, f"weight {i} of the scaled group")
    Ws = [w.float() for w in weights]
    H = H.float()
    x_mean = x_absmean.float().clamp(min=1e-8)
    w_mean = _normalised_weight_mean(torch.cat(Ws), scheme)

    def error(scale: Tensor | None) -> float:
        total = 0.0
        for w in Ws:
            if scale is None:
                delta = fake_quantize(w, scheme) - w
            else:
                delta = fake_quantize(w * scale, scheme) / scale - w
            total += float(output_error(delta, H).sum())
        return total

    unscaled = error(None)
    best = ScaleSearch(torch.ones_like(x_mean), None, unscaled, unscaled)
    for i in range(config.grid):
        a = i / config.grid
        s = x_mean.pow(a) / (w_mean.pow(1 - a) + 1e-4) if config.duo_scaling else x_mean.pow(a)
        s = s.clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        err = error(s)
        if err < best.error:
            best = ScaleSearch(s, a, unscaled, err)
    return best


def _normalised_weight_mean(W: Tensor, scheme: QuantScheme) -> Tensor:
    """Mean over output rows of ``|w|`` divided by its row's (group's) max: AutoAWQ's ``w_mean``."""
    rows = weight_rows(W, scheme).abs()
    rows = rows / (rows.amax(dim=1, keepdim=True) + 1e-6)
    return rows.reshape(W.shape).mean(dim=0)


@torch.no_grad()
def awq_quantize(weight: Tensor, H: Tensor, scheme: QuantScheme, config: AWQConfig = AWQConfig(), *,
                 layer: str = "weight") -> QuantizedWeight:
    """Round ``weight [out, in]`` (already scaled) to its grid with AWQ's clipping search.

    Each row (group) keeps the shrink factor of its min/max range with the smallest output error
    on the calibration inputs, measured with the group's diagonal block of ``H``. With
    ``config.clip`` False this is RTN with the scheme's observer.

    Raises:
        ValueError: NaN/Inf weights, a group size that does not divide, a Hessian of the wrong shape.
    """
    check_finite(weight, layer)
    if not config.clip:
        rows, scale, zero = rtn_params(weight, scheme, layer)
        return weight_from_rows(rows, scale, zero, scheme, tuple(weight.shape))
    out_features, in_features = weight.shape
    if tuple(H.shape) != (in_features, in_features):
        raise ValueError(f"Hessian of {layer} must be [{in_features}, {in_features}], got {tuple(H.shape)}")
    fmt = scheme.number_format()
    R, G = rows_shape(tuple(weight.shape), scheme, layer)
    rows = weight_rows(weight, scheme, layer)
    fake_quant = fake_quantizer(fmt, scheme)
    lo0, hi0 = observe_range(rows, "minmax", symmetric=scheme.symmetric, fake_quant=fake_quant,
                             levels=2**scheme.bits)
    blocks = _diagonal_blocks(H.float(), G if R > 1 else 1)
    best_err = torch.full((rows.shape[0],), float("inf"), device=rows.device)
    best_lo, best_hi = lo0.clone(), hi0.clone()
    for i in range(int(config.max_shrink * config.clip_grid) + 1):
        factor = 1.0 - i / config.clip_grid
        lo, hi = lo0 * factor, hi0 * factor
        delta = fake_quant(rows, lo, hi) - rows
        err = _row_errors(delta.reshape(out_features, in_features), blocks, R, G)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo, best_hi = torch.where(better, lo, best_lo), torch.where(better, hi, best_hi)
    scale, zero = qparams(best_lo, best_hi, fmt, scheme)
    return weight_from_rows(rows, scale, zero, scheme, tuple(weight.shape))


def _diagonal_blocks(H: Tensor, G: int) -> Tensor:
    """``[G, g, g]``: the diagonal blocks of ``H`` for ``G`` groups of ``g = in / G`` columns."""
    g = H.shape[0] // G
    return torch.stack([H[k * g:(k + 1) * g, k * g:(k + 1) * g] for k in range(G)])


def _row_errors(delta: Tensor, blocks: Tensor, R: int, G: int) -> Tensor:
    """Output error per quantization row: per (output row, group), or summed for a per-tensor scale."""
    out_features = delta.shape[0]
    d = delta.reshape(out_features, G if R > 1 else 1, -1)
    err = torch.einsum("ogi,gij,ogj->og", d, blocks, d)
    return err.reshape(-1) if R > 1 else err.sum().reshape(1)


@register_method("awq", config=AWQConfig, statistics=[Statistic.HESSIAN],
                 summary="AWQ's clipping search on the output error (Hessian); with its scales: transform awq")
@per_weight
def _solve_awq(weight: Tensor, scheme: QuantScheme, config: AWQConfig, statistics: InputStatistics,
               layer: str) -> QuantizedWeight:
    return awq_quantize(weight, statistics["hessian"], scheme, config, layer=layer)


@register_transform("awq", config=AWQConfig, kind=TransformKind.CHANNEL_SCALING, statistics=[Statistic.HESSIAN],
                    summary="AWQ's activation-aware input scales, searched on the output error (Hessian)")
def _awq_scales(weights: Sequence[Tensor], scheme: QuantScheme, config: AWQConfig,
                statistics: InputStatistics) -> ChannelScales:
    found = search_scales(weights, statistics["hessian"], statistics["absmean"], scheme, config)
    return ChannelScales(None if found.exponent is None else found.scale, {"exponent": found.exponent})

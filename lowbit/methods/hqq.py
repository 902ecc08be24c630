"""HQQ: data-free optimisation of each row's zero-point (or scale) by half-quadratic splitting.

Badri & Shaji 2023, "Half-Quadratic Quantization of Large Machine Learning Models"; the maths follows
mobiusml/hqq ``optimize_weights_proximal_legacy``. HQQ minimises ``||W - W_r||_p^p`` with ``p < 1``,
which tolerates a few large errors (heavy-tailed outliers) in exchange for small errors everywhere
else. Splitting adds ``W_e ~ W - W_r`` and alternates, per row, with ``W_r = s (W_q - z)``:

    W_q = clamp(round(W / s + z))            # codes for the current zero-point
    W_e = shrink_lp(W - W_r, beta, p)         # proximal step of the lp term
    z   = mean(W_q - (W - W_e) / s)           # closed-form least squares of z
    beta *= kappa

What each scheme optimises:

- asymmetric int, ``ZeroPoint.FLOAT`` (``w' = s q + m``): the float minimum ``m = -s z``, stored in
  float16. HQQ's own setting.
- asymmetric int, ``ZeroPoint.INT`` (``w' = s (q - z)``): ``z`` is optimised as a float, then rounded
  to the integer grid to be stored. Rounding moves ``z`` by up to half a step, which loses part of
  the gain (with the min/max scale the float ``z`` rarely moves more than half a step, so rounding
  usually lands back on RTN's ``z``). The same splitting then optimises the scale for the rounded
  ``z``, ``s = <W - W_e, W_q - z> / ||W_q - z||^2``, which is where most of this path's gain is.
- symmetric formats (int, nf4, fp4, fp8) have no zero-point: the scale alone is optimised, by
  alternating the closed-form least-squares scale for fixed codes, ``s = <W, v> / <v, v>`` with
  ``v`` the codes' grid values, with re-rounding the codes to the new scale. That minimises the
  squared error (``lp_norm``, ``beta`` and ``kappa`` are not used), so each step can only help.

Every path starts from the scheme's observer range (RTN's parameters) and keeps, per row, the best
iterate in the stored form (float16 scale and minimum, integer zero-point), with the initial one
among the candidates. HQQ is therefore never worse than RTN on its objective (the lp error for
asymmetric schemes, the squared error for symmetric ones). Iterations stop early once the
objective summed over all rows stops decreasing (for the splitting, that of the float iterate, as in
the reference). All rows and groups are optimised at once; everything is float32 and deterministic.

With ``double_quant`` the codes are chosen for the float16 scales, which ``QuantizedWeight`` then
stores in 8 bits, as RTN does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lowbit.formats import NumberFormat
from lowbit.methods.registry import InputStatistics, per_weight, register_method
from lowbit.methods.rtn import rtn_params, weight_from_rows
from lowbit.quantizer import MIN_SCALE, dequantize_rows, quantize_rows
from lowbit.qweight import QuantizedWeight
from lowbit.scheme import QuantScheme, ZeroPoint


@dataclass(frozen=True)
class HQQConfig:
    """HQQ's knobs; the defaults are the reference's ``optimize_weights_proximal_legacy`` ones."""

    lp_norm: float = 0.7  # p of the error norm; p < 1 lets outliers keep a large error
    beta: float = 1e1  # initial weight of the splitting penalty; small beta shrinks W_e more
    kappa: float = 1.01  # beta grows by this factor every iteration
    iters: int = 20

    def __post_init__(self) -> None:
        if not 0.0 < self.lp_norm <= 1.0:
            raise ValueError(f"lp_norm must be in (0, 1], got {self.lp_norm!r}; the default is 0.7")
        if not self.beta > 0.0:
            raise ValueError(f"beta must be > 0, got {self.beta!r}; the default is 10.0")
        if not self.kappa >= 1.0:
            raise ValueError(f"kappa must be >= 1, got {self.kappa!r}; the default is 1.01")
        if not (isinstance(self.iters, int) and self.iters >= 0):
            raise ValueError(f"iters must be an int >= 0, got {self.iters!r}; the default is 20")


@torch.no_grad()
def quantize_hqq(weight: Tensor, scheme: QuantScheme, *, layer: str = "weight",
                 config: HQQConfig = HQQConfig()) -> QuantizedWeight:
    """Quantize ``weight [out, in]`` with HQQ-optimised zero-points (asymmetric) or scales (symmetric).

    Raises:
        ValueError: NaN/Inf in ``weight``, or a group size that does not divide ``in_features``.
    """
    rows, scale, zero = rtn_params(weight, scheme, layer)
    fmt = scheme.number_format()
    if zero is None:
        scale = optimize_scale(rows, scale, fmt, scheme, config.iters)
    else:
        zero = optimize_zero(rows, scale, zero, fmt, scheme, config)
        if scheme.zero_point is ZeroPoint.INT:
            scale = optimize_int_scale(rows, scale, zero, fmt, scheme, config)
    return weight_from_rows(rows, scale, zero, scheme, tuple(weight.shape))


@register_method("hqq", config=HQQConfig, summary="half-quadratic optimisation of zero-points or scales (data-free)")
@per_weight
def _solve_hqq(weight: Tensor, scheme: QuantScheme, config: HQQConfig, statistics: InputStatistics,
               layer: str) -> QuantizedWeight:
    return quantize_hqq(weight, scheme, layer=layer, config=config)


def shrink_lp(x: Tensor, beta: float, p: float) -> Tensor:
    """Proximal operator of ``|x|^p / beta`` (generalised soft threshold, HQQ eq. 6)."""
    if p == 1.0:
        return torch.sign(x) * torch.relu(x.abs() - 1.0 / beta)
    return torch.sign(x) * torch.relu(x.abs() - (x.abs() + 1e-8).pow(p - 1.0) / beta)  # 1e-8 as the reference


def lp_error(rows: Tensor, rows_hat: Tensor, p: float) -> Tensor:
    """``sum |rows - rows_hat|^p`` per row: HQQ's objective, ``[R]``."""
    return (rows - rows_hat).abs().pow(p).sum(1)


def optimize_zero(W: Tensor, scale: Tensor, zero: Tensor, fmt: NumberFormat, scheme: QuantScheme,
                  config: HQQConfig) -> Tensor:
    """Per-row stored zero-points (INT) or float minimums (FLOAT) ``[R]`` minimising the lp error.

    ``W [R, n]`` float32 rows, ``scale [R]`` stored scales, ``zero [R]`` the starting point in the
    scheme's form. The splitting runs on the float ``z`` of ``w' = s (q - z)`` for both forms.
    """
    p, beta = config.lp_norm, config.beta
    s = scale[:, None]
    z = (zero if scheme.zero_point is ZeroPoint.INT else -zero / scale)[:, None]
    qmax = 2**scheme.bits - 1
    best = zero
    best_err = lp_error(W, dequantize_rows(quantize_rows(W, scale, zero, fmt, scheme), scale, zero, fmt, scheme), p)
    total = float("inf")
    for _ in range(config.iters):
        W_q = torch.round(W / s + z).clamp_(0, qmax)
        W_r = s * (W_q - z)
        # Stop as the reference does, once the error of the float iterate stops decreasing: the
        # stored (rounded) zero-point of an INT scheme can stay put for several iterations.
        err = lp_error(W, W_r, p).sum()
        if err >= total:
            break
        total = err
        W_e = shrink_lp(W - W_r, beta, p)
        z = (W_q - (W - W_e) / s).mean(1, keepdim=True)
        beta *= config.kappa
        cand = stored_zero(z[:, 0], scale, scheme)
        cand_err = lp_error(W, dequantize_rows(quantize_rows(W, scale, cand, fmt, scheme), scale, cand, fmt, scheme), p)
        better = cand_err < best_err
        best, best_err = torch.where(better, cand, best), torch.where(better, cand_err, best_err)
    return best


def optimize_int_scale(W: Tensor, scale: Tensor, zero: Tensor, fmt: NumberFormat, scheme: QuantScheme,
                       config: HQQConfig) -> Tensor:
    """Per-row stored scales ``[R]`` minimising the lp error for fixed integer zero-points ``zero [R]``.

    The same splitting as ``optimize_zero`` with the scale's closed-form update instead,
    ``s = <W - W_e, W_q - z> / ||W_q - z||^2``: it wins back part of what rounding ``z`` lost.
    """
    p, beta = config.lp_norm, config.beta
    s, z = scale[:, None], zero[:, None]
    qmax = 2**scheme.bits - 1
    best = scale
    best_err = lp_error(W, dequantize_rows(quantize_rows(W, scale, zero, fmt, scheme), scale, zero, fmt, scheme), p)
    total = float("inf")
    for _ in range(config.iters):
        d = torch.round(W / s + z).clamp_(0, qmax) - z
        err = lp_error(W, s * d, p).sum()
        if err >= total:
            break
        total = err
        W_e = shrink_lp(W - s * d, beta, p)
        dd = (d * d).sum(1, keepdim=True)
        s = torch.where(dd > 0, ((W - W_e) * d).sum(1, keepdim=True) / dd.clamp(min=1.0), s)
        s = s.clamp(min=MIN_SCALE, max=65504.0).half().float()  # stored as float16
        beta *= config.kappa
        cand_err = lp_error(W, dequantize_rows(quantize_rows(W, s[:, 0], zero, fmt, scheme), s[:, 0], zero, fmt,
                                               scheme), p)
        better = cand_err < best_err
        best, best_err = torch.where(better, s[:, 0], best), torch.where(better, cand_err, best_err)
    return best


def stored_zero(z: Tensor, scale: Tensor, scheme: QuantScheme) -> Tensor:
    """The float zero-point ``z [R]`` as the scheme stores it: an integer code or a float16 minimum."""
    if scheme.zero_point is ZeroPoint.INT:
        return torch.round(z).clamp_(0, 2**scheme.bits - 1)
    return (-z * scale).half().float()


def optimize_scale(W: Tensor, scale: Tensor, fmt: NumberFormat, scheme: QuantScheme, iters: int) -> Tensor:
    """Per-row stored scales ``[R]`` minimising the squared error of a symmetric grid.

    Alternates ``s = <W, v> / <v, v>`` (least squares for fixed grid values ``v``) with re-rounding.
    """
    best = scale
    v = fmt.decode(quantize_rows(W, scale, None, fmt, scheme))
    best_err = (W - v * scale[:, None]).pow(2).sum(1)
    total = best_err.sum()
    for _ in range(iters):
        vv = (v * v).sum(1)
        ls = (W * v).sum(1) / vv.clamp(min=torch.finfo(torch.float32).tiny)
        cand = torch.where(vv > 0, ls, best).clamp(min=MIN_SCALE, max=65504.0).half().float()  # stored as float16
        v = fmt.decode(quantize_rows(W, cand, None, fmt, scheme))
        err = (W - v * cand[:, None]).pow(2).sum(1)
        better = err < best_err
        best, best_err = torch.where(better, cand, best), torch.where(better, err, best_err)
        if err.sum() >= total:
            break
        total = err.sum()
    return best

"""Range observers: choose the clipping range [lo, hi] that a quantizer maps onto its grid.

Every observer works on a 2-D tensor ``x`` of shape ``[R, N]`` in which each ROW is an
independent set of values that gets one range: for weights a row is an output channel or a
group, for activations a row is the whole tensor (``R == 1``) or one channel.

Observers:

- ``minmax``: the row's min and max (symmetric: +-absmax).
- ``percentile``: the row's ``percentile``-th quantile (and ``100 - percentile`` for the low end),
  linear interpolation as in ``numpy.percentile``.
- ``mse``: GPTQ's shrink search (IST-DASLab/gptq ``quant.py`` ``Quantizer.find_params(mse=True)``):
  try ranges ``p * [lo0, hi0]`` and keep, per row, the one whose fake-quantized error is smallest.
- ``kl``: entropy calibration from "8-bit Inference with TensorRT" (Migacz, GTC 2017), as in
  pytorch-quantization ``calib/histogram.py`` ``_compute_amax_entropy``.

All observers return float32 ``(lo, hi)`` with ``lo <= 0 <= hi``; symmetric ranges have
``lo == -hi``. A row of all zeros gets the range ``(0, 0)``: turning a zero range into a usable
scale (e.g. ``scale = max(scale, eps)``) is left to the caller.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from enum import Enum

import torch
from torch import Tensor

FakeQuant = Callable[[Tensor, Tensor, Tensor], Tensor]
"""``fake_quant(x [R, N] float32, lo [R], hi [R]) -> x_hat [R, N]``: quantize-dequantize each row
with the range ``[lo, hi]``. A symmetric fake_quant ignores ``lo`` and uses ``max(|lo|, hi)``."""

# Bound how many elements one kthvalue call copies (torch.quantile refuses inputs above 2**24).
_SORT_CHUNK_ELEMS = 1 << 22
# Upper bound on the float64 working set of one KL chunk (histograms or candidate tables).
_KL_CHUNK_BYTES = 64 << 20
# Histogram bins per row element when N is small: a 32-value group in 2048 bins would be an
# almost empty histogram. 4 bins per value gives int4's 8 positive levels 16 bins each at N = 32,
# the same bins-per-level ratio as TensorRT's 2048 bins for int8's 128 levels.
_KL_BINS_PER_ELEMENT = 4
# At most this many candidate thresholds per row. Rows of up to this many values are searched
# exactly (one candidate per value); longer rows use a strided grid, which keeps the threshold
# within 1/512 of absmax, far finer than any 4-bit grid step.
_KL_MAX_CANDIDATES = 512


class Observer(str, Enum):
    """How a row's clipping range is chosen (see the module docstring)."""

    MINMAX = "minmax"
    PERCENTILE = "percentile"
    MSE = "mse"
    KL = "kl"


@torch.no_grad()
def observe_range(
    x: Tensor,
    observer: Observer | str,
    *,
    symmetric: bool,
    fake_quant: FakeQuant,
    levels: int,
    percentile: float = 99.99,
    mse_steps: int = 80,
    mse_min_shrink: float = 0.2,
    kl_bins: int = 2048,
) -> tuple[Tensor, Tensor]:
    """Choose one clipping range per row of ``x``.

    Args:
        x: ``[R, N]`` floating tensor, any float dtype (computed in float32); every row gets one range.
        observer: an :class:`Observer` or its value (``"minmax"``, ``"percentile"``, ``"mse"``, ``"kl"``).
        symmetric: return ``lo == -hi`` (the range of ``|x|``) instead of an asymmetric range.
        fake_quant: quantize-dequantize callable (see :data:`FakeQuant`); used by ``mse`` only.
            It must cope with zero-range rows (all-zero rows give ``lo == hi == 0``).
        levels: number of grid points of the target format (16 for int4); used by ``kl`` only,
            which spreads ``levels // 2`` levels over each side of zero.
        percentile: in ``(50, 100]``; the high-end quantile for ``percentile``.
        mse_steps: ``>= 1`` shrink factors tried by ``mse``, ``linspace(1, mse_min_shrink, mse_steps)``.
        mse_min_shrink: in ``(0, 1]``; the smallest shrink factor tried by ``mse``.
        kl_bins: ``>= 1``; histogram bins for ``kl`` before the small-N rule (see :func:`kl_num_bins`).

    Returns:
        ``(lo [R], hi [R])`` float32 on ``x``'s device with ``lo <= 0 <= hi``: asymmetric ranges are
        widened to include zero so that zero is exactly representable. All-zero rows give ``(0, 0)``;
        the caller guards the resulting zero scale.

    Raises:
        ValueError: unknown observer, ``x`` not 2-D, empty ``x``, NaN/Inf in ``x``, or an out-of-range
            ``percentile`` / ``mse_steps`` / ``mse_min_shrink`` / ``kl_bins`` / ``levels``.
    """
    observer = _parse_observer(observer)
    x = _check_input(x)
    if observer is Observer.MINMAX:  # NaN/Inf reach the row extremes: checking those is enough
        lo, hi = _minmax_range(x, symmetric)
        _check_finite(torch.stack([lo, hi]), x)
        return lo, hi
    _check_finite(x, x)
    if observer is Observer.PERCENTILE:
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {percentile!r}; e.g. use 99.99")
        return _percentile_range(x, symmetric, percentile)
    if observer is Observer.MSE:
        if not (isinstance(mse_steps, int) and mse_steps >= 1):
            raise ValueError(f"mse_steps must be an int >= 1, got {mse_steps!r}; the default is 80")
        if not 0.0 < mse_min_shrink <= 1.0:
            raise ValueError(f"mse_min_shrink must be in (0, 1], got {mse_min_shrink!r}; the default is 0.2")
        return _mse_range(x, symmetric, fake_quant, mse_steps, mse_min_shrink)
    if not (isinstance(levels, int) and levels >= 2):
        raise ValueError(f"levels must be an int >= 2 (e.g. 16 for int4), got {levels!r}")
    if not (isinstance(kl_bins, int) and kl_bins >= 1):
        raise ValueError(f"kl_bins must be an int >= 1, got {kl_bins!r}; the default is 2048")
    return _kl_range(x, symmetric, levels, kl_bins)


def _parse_observer(observer: Observer | str) -> Observer:
    try:
        return Observer(observer)
    except ValueError:
        valid = ", ".join(repr(o.value) for o in Observer)
        raise ValueError(f"unknown observer {observer!r}; valid observers are {valid}") from None


def _check_input(x: Tensor) -> Tensor:
    """Validate ``x`` and return it as float32."""
    if not isinstance(x, Tensor) or x.dim() != 2:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"observer input must be a 2-D [rows, values] tensor, got {shape}; reshape it first")
    if x.numel() == 0:
        raise ValueError(
            f"observer input is empty (shape {tuple(x.shape)}); it needs at least one value per row"
        )
    if not x.is_floating_point():
        raise ValueError(f"observer input must be a floating tensor, got {x.dtype}; call .float() first")
    return x.float()


def _check_finite(summary: Tensor, x: Tensor) -> None:
    """Raise when ``summary`` (``x`` itself, or statistics NaN/Inf would reach) is not all finite."""
    if not bool(torch.isfinite(summary).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"observer got non-finite values (NaN/Inf) in {bad} elements; "
                         "check the weights/activations for overflow")


def _finish(lo: Tensor, hi: Tensor, symmetric: bool) -> tuple[Tensor, Tensor]:
    """Enforce the contract: float32, ``lo <= 0 <= hi``, and ``lo == -hi`` when symmetric."""
    if symmetric:
        hi = torch.maximum(lo.abs(), hi.abs())
        return (-hi).float(), hi.float()
    return lo.clamp(max=0.0).float(), hi.clamp(min=0.0).float()


def _minmax_range(x: Tensor, symmetric: bool) -> tuple[Tensor, Tensor]:
    if symmetric:
        amax = x.abs().amax(dim=1)
        return _finish(-amax, amax, True)
    return _finish(x.amin(dim=1), x.amax(dim=1), False)


def _row_quantiles(x: Tensor, qs: tuple[float, ...]) -> list[Tensor]:
    """``[R, N] -> [R]`` per quantile in ``qs`` (each in [0, 1]), linear interpolation as numpy's default.

    Uses ``kthvalue`` for the two order statistics around each quantile (O(N), ~4x faster than a
    full sort for long rows) on chunks of at most ``_SORT_CHUNK_ELEMS`` elements, so any size works
    (``torch.quantile`` refuses more than 2**24 elements).
    """
    N = x.shape[1]
    rows = max(1, _SORT_CHUNK_ELEMS // N)
    out = []
    for q in qs:
        pos = q * (N - 1)
        i0 = min(int(math.floor(pos)), N - 1)
        i1 = min(i0 + 1, N - 1)
        parts = []
        for xc in x.split(rows):
            v0 = xc.kthvalue(i0 + 1, dim=1).values  # kthvalue's k is 1-based
            v1 = xc.kthvalue(i1 + 1, dim=1).values if i1 != i0 else v0
            parts.append(torch.lerp(v0, v1, pos - i0))
        out.append(torch.cat(parts))
    return out


def _percentile_range(x: Tensor, symmetric: bool, percentile: float) -> tuple[Tensor, Tensor]:
    q = percentile / 100.0
    if symmetric:
        (t,) = _row_quantiles(x.abs(), (q,))
        return _finish(-t, t, True)
    lo, hi = _row_quantiles(x, (1.0 - q, q))
    return _finish(lo, hi, False)


def _mse_range(
    x: Tensor, symmetric: bool, fake_quant: FakeQuant, steps: int, min_shrink: float
) -> tuple[Tensor, Tensor]:
    """GPTQ's ``find_params(mse=True)`` shrink search with a squared-error norm.

    GPTQ tries ``p = 1 - k / grid`` for ``k < maxshrink * grid`` (grid=100, maxshrink=0.8,
    error norm 2.4); here ``p = linspace(1, min_shrink, steps)`` and the error is
    ``sum((x - fake_quant(x, p*lo0, p*hi0))**2)`` per row. Ties keep the wider range, so the
    result is never worse than minmax (``p = 1``). NaN errors (e.g. zero-range rows) never win.
    """
    lo0, hi0 = _minmax_range(x, symmetric)
    best_lo, best_hi = lo0.clone(), hi0.clone()
    best_err = torch.full_like(lo0, math.inf)
    for p in torch.linspace(1.0, min_shrink, steps).tolist():
        lo, hi = p * lo0, p * hi0
        err = (x - fake_quant(x, lo, hi)).pow_(2).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo = torch.where(better, lo, best_lo)
        best_hi = torch.where(better, hi, best_hi)
    return _finish(best_lo, best_hi, symmetric)


def kl_num_bins(kl_bins: int, levels: int, n: int) -> int:
    """Histogram bins the ``kl`` observer uses for rows of ``n`` values.

    ``min(kl_bins, 4 * n)``, but at least ``levels``: few values in many bins make an almost
    empty histogram, so small groups get ~4 bins per value (int4 groups of 32: 128 bins, 16 per
    positive level, TensorRT's 2048 / 128 ratio); at least ``levels`` bins leave room for
    candidate thresholds above the ``levels // 2`` starting bin.
    """
    return max(levels, min(kl_bins, _KL_BINS_PER_ELEMENT * n))


def _kl_range(x: Tensor, symmetric: bool, levels: int, kl_bins: int) -> tuple[Tensor, Tensor]:
    """TensorRT entropy calibration per row: ``|x|`` (symmetric) or each sign separately.

    As in TensorRT, candidates start at ``levels // 2`` bins, so the threshold is never below
    ``(levels // 2) / bins`` of the side's max (int8 with 2048 bins: 1/16). Zeros count on both
    sides of an asymmetric range.
    """
    B = kl_num_bins(kl_bins, levels, x.shape[1])
    nq = levels // 2  # positive levels; asymmetric ranges spend levels // 2 on each side too
    if symmetric:
        t = _kl_thresholds(x.abs(), torch.ones_like(x, dtype=torch.bool), B, nq)
        return _finish(-t, t, True)
    t_pos = _kl_thresholds(x.clamp(min=0.0), x >= 0, B, nq)
    t_neg = _kl_thresholds((-x).clamp(min=0.0), x <= 0, B, nq)
    return _finish(-t_neg, t_pos, False)


def _kl_thresholds(v: Tensor, mask: Tensor, B: int, nq: int) -> Tensor:
    """``v [R, N] >= 0``, ``mask [R, N]`` (which values count) -> threshold ``[R]`` per row.

    Rows are processed in chunks so that a chunk's float64 histograms stay under ``_KL_CHUNK_BYTES``.
    The threshold is TensorRT's ``(i + 0.5) * bin_width`` for the best bin count ``i``, capped at the
    row's max (``i == B`` keeps everything and should not widen the range).
    """
    N = v.shape[1]
    amax = torch.where(mask, v, 0.0).amax(dim=1)
    rows = max(1, _KL_CHUNK_BYTES // (8 * (4 * B + 2 * N)))  # hist, C, Z, HL + bin indices
    out = []
    for vc, mc, ac in zip(v.split(rows), mask.split(rows), amax.split(rows)):
        width = ac / B
        idx = (vc / torch.where(ac > 0, width, 1.0).unsqueeze(1)).floor_().clamp_(0, B - 1).long()
        hist = torch.zeros(vc.shape[0], B, dtype=torch.float64, device=v.device)
        hist.scatter_add_(1, idx, mc.to(torch.float64))
        i_best = _kl_best_bins(hist, _kl_candidates(idx.masked_fill_(~mc, B - 1), B, nq), nq)
        out.append(torch.minimum((i_best.to(torch.float32) + 0.5) * width, ac))
    return torch.cat(out)


def _kl_candidates(idx: Tensor, B: int, nq: int) -> Tensor:
    """Candidate bin counts ``i`` in ``[nq, B]`` per row (TensorRT: ``range(128, 2048)``) -> ``[r, M]``.

    KL is infinite unless bin ``i - 1`` holds data or nothing lies beyond it (``i == B``), so for
    rows of at most ``_KL_MAX_CANDIDATES`` values the exact search only needs ``i = bin(value) + 1``
    for each value (``idx [r, N]``, the values' bins; the row max gives ``i == B``), without repeats
    (many values share a bin, and all bins below ``nq`` map to ``nq``). Longer rows
    use every ``stride``-th count from ``nq`` so that at most ``_KL_MAX_CANDIDATES`` remain, plus ``B``.
    """
    r, N = idx.shape
    if N <= _KL_MAX_CANDIDATES:
        cand = (idx + 1).clamp_(nq, B).sort(dim=1).values
        cand[:, 1:].masked_fill_(cand[:, 1:] == cand[:, :-1], B)  # drop repeats (B is always there)
        cand = cand.sort(dim=1).values
        distinct = int((cand < B).sum(dim=1).max()) + 1
        return cand[:, :distinct]  # the distinct candidates of each row, padded with B
    return kl_strided_candidates(B, nq, idx.device).expand(r, -1)


def kl_strided_candidates(B: int, nq: int, device: torch.device | str = "cpu") -> Tensor:
    """Bin counts ``nq, nq + stride, ...`` below ``B``, plus ``B``: at most ``_KL_MAX_CANDIDATES + 1``
    candidates for a histogram of ``B`` bins (long rows here, streamed activation histograms)."""
    stride = max(1, math.ceil((B - nq + 1) / _KL_MAX_CANDIDATES))
    return torch.cat([torch.arange(nq, B, stride), torch.tensor([B])]).to(device)


def _kl_best_bins(hist: Tensor, cand: Tensor, nq: int) -> Tensor:
    """``hist [r, B]`` float64 counts, ``cand [r, M]`` -> ``[r]`` long: the candidate bin count ``i``
    minimising KL(P||Q).

    Ties go to the largest ``i`` (least clipping), as pytorch-quantization's "last argmin"; KLs
    within 1e-9 of the minimum count as tied, far above the float64 rounding of the collapsed sums
    (~1e-15) so that exact ties (e.g. KL = 0 on sparse rows) are not broken by rounding.
    Candidates are evaluated in chunks bounded by ``_KL_CHUNK_BYTES``.
    """
    r, B = hist.shape
    zero = hist.new_zeros(r, 1)
    C = torch.cat([zero, hist.cumsum(1)], 1)  # C[:, i] = sum(hist[:, :i])
    Z = torch.cat([zero, (hist > 0).to(hist.dtype).cumsum(1)], 1)  # non-empty bins before i
    HL = torch.cat([zero, torch.xlogy(hist, hist).cumsum(1)], 1)  # sum of h log h before i
    # bounds[i, g] = ceil(g * i / nq): group g of candidate i is bins [bounds[i, g], bounds[i, g+1])
    i_all, g = torch.arange(B + 1, device=hist.device), torch.arange(nq + 1, device=hist.device)
    bounds = (i_all.unsqueeze(1) * g + nq - 1) // nq
    per_chunk = max(1, _KL_CHUNK_BYTES // (8 * 6 * r * (nq + 1)))
    chunks = cand.split(per_chunk, dim=1)
    kl = torch.cat([_kl_divergence(hist, C, Z, HL, bounds, ic) for ic in chunks], dim=1)
    is_min = kl <= kl.amin(dim=1, keepdim=True) + 1e-9 * C[:, -1:]  # kl is T * KL, so tolerance T * 1e-9
    return torch.where(is_min, cand, -1).amax(dim=1)


def _kl_divergence(hist: Tensor, C: Tensor, Z: Tensor, HL: Tensor, bounds: Tensor, i: Tensor) -> Tensor:
    """``T * KL(P||Q)`` for each row and each candidate bin count in ``i [r, M]`` -> ``[r, M]``.

    TensorRT (Migacz 2017, "entropy calibration" slides): P = hist[:i] with the outlier mass
    ``O = hist[i:].sum()`` added to P[i-1]; Q = hist[:i] (without outliers) merged into ``nq``
    groups (bin j -> group floor(j * nq / i), as pytorch-quantization's np.digitize) and each
    group's mass spread uniformly over its non-empty bins; both normalised. With T = sum(P),
    A = sum(Q), group mass G and non-empty count n, the sum over bins collapses to
    ``T*KL = sum h log h + A log(A/T) - sum_g G log(G/n)`` plus a correction for bin i-1, so
    each candidate costs O(nq) instead of O(i). KL is infinite when O > 0 lands in an empty bin.
    The constant factor 1/T does not change the argmin over candidates, so it is left out.
    """
    r, M = i.shape
    nq = bounds.shape[1] - 1
    b = bounds.index_select(0, i.flatten()).view(r, -1)  # [r, M*(nq+1)]
    G = C.gather(1, b).view(r, M, nq + 1).diff(dim=2)  # [r, M, nq] group mass
    n = Z.gather(1, b).view(r, M, nq + 1).diff(dim=2)  # [r, M, nq] non-empty bins per group
    # log(G/n), the log of Q's per-bin mass in each group; counts are integers, so G/n >= 1 where
    # G > 0, and clamping at 1 makes empty groups add 0 (faster than xlogy, which dominated)
    log_mean = (G / n.clamp(min=1)).clamp_(min=1).log_()
    group_term = (G * log_mean).sum(2)  # sum_g G log(G/n)
    T, A = C[:, -1:], C.gather(1, i)
    O = T - A
    h_last = hist.gather(1, i - 1)
    P_last = h_last + O
    log_r = log_mean[..., -1]  # log Q[i-1], unnormalised (used only where h_last > 0)
    log_A_over_T = A.clamp(min=1e-300).log() - T.clamp(min=1e-300).log()
    base = HL.gather(1, i) + A * log_A_over_T - group_term
    corr = torch.xlogy(P_last, P_last) - torch.xlogy(h_last, h_last) + O * (log_A_over_T - log_r)
    kl = base + torch.where(h_last > 0, corr, 0.0)
    return torch.where((h_last == 0) & (O > 0), math.inf, kl)

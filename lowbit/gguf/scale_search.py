"""llama.cpp's per-block scale searches (ggml-quants.c), vectorised over blocks with numpy.

Each function works on ``B`` independent blocks at once: ``x`` float32 ``[B, n]`` and per-value error
weights ``w`` float32 ``[B, n]``. llama.cpp runs the same search one block at a time in C; here every
candidate scale, and every step of the coordinate descents, is one array operation over all
blocks. Codes come back as float32 arrays holding integers (packing converts them to bytes).

Ported from ggml-quants.c (ggml-org/llama.cpp, 2025): ``make_qx_quants``, ``make_q3_quants``,
``make_qkx2_quants``/``make_qkx3_quants`` (one function here) and ``make_qp_quants``. Arithmetic is
float32 and every sum runs in C's order (``sum0``; blocks are held value-major, ``[n, B]``, inside):
the searches compare candidate errors and round float16 scales, and a sum in another order can
flip a near-tie, so with sums in order the bytes match llama.cpp's C build (without FMA contraction). Where C relies on undefined behaviour (``nearest_int`` of
inf or NaN in a degenerate block) the port clamps codes into range instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

F32 = np.float32
GROUP_MAX_EPS = F32(1e-15)  # ggml-quants.c: a block whose largest |x| is below this is all zero
N_DESCENT_PASSES = 5  # make_q3_quants / make_qp_quants: passes of one-code-at-a-time refinement


@dataclass(frozen=True)
class BlockFit:
    """What a block type's search chose for ``B`` blocks of ``bs`` values, before packing.

    Kept apart from the packing so that a caller (GPTQ) can take the parameters and choose its
    own codes on their grid. Fields:
        params: uint8 ``[B, P]``, the stored parameter bytes of each block (float16 scales and
            minimums, quantized sub-block scales) in the block's byte order, the code bytes left out.
        step, bias: float32 ``[B, S]``, one per sub-block of ``bs / S`` values, computed from the
            stored parameters as gguf-py's decoder computes them: code ``c`` decodes to
            ``step * (c + lo) + bias`` (``bias`` is 0 for the symmetric types).
        codes: uint8 ``[B, bs]`` in ``0..hi - lo``, the search's own codes.
        lo, hi: the signed levels of the codes' grid.
        levels: None for a uniform grid; for a table grid (IQ4_NL, IQ4_XS, MXFP4) float32
            ``[hi - lo + 1]``, and code ``c`` decodes to ``step * levels[c] + bias`` instead.
    """

    params: np.ndarray
    step: np.ndarray
    bias: np.ndarray
    codes: np.ndarray
    lo: int
    hi: int
    levels: np.ndarray | None = None


def round_half_away(v: np.ndarray) -> np.ndarray:
    """C's ``roundf``/``lroundf``, exactly (``floor(|v| + 0.5)`` can round up ``0.49999997`` in float32)."""
    a = np.abs(v)
    fl = np.floor(a)
    return np.copysign(fl + np.floor(F32(2) * (a - fl)), v)


def sum0(a: np.ndarray) -> np.ndarray:
    """Sum a contiguous ``[n, B]`` over axis 0 in index order, as C's ``for`` loops add.

    numpy adds the rows of a ``[n, B]`` array one after the other, but sums a lone column
    (``B == 1``) pairwise, like any contiguous run; ``accumulate`` is in order by definition.
    """
    return np.add.reduce(a, axis=0) if a.shape[1] > 1 else np.add.accumulate(a, axis=0)[-1]


def seq_sum(a: np.ndarray) -> np.ndarray:
    """Sum over the last axis in C's order (numpy's ``sum`` over a contiguous axis is pairwise)."""
    cols = np.ascontiguousarray(np.moveaxis(a, -1, 0)).reshape(a.shape[-1], -1)
    return sum0(cols).reshape(a.shape[:-1])


def _value_major(*arrays: np.ndarray) -> list[np.ndarray]:
    """``[B, n]`` blocks -> contiguous ``[n, B]``, where sums over axis 0 run in C's order."""
    return [np.ascontiguousarray(a.T, dtype=F32) for a in arrays]


def _safe(den: np.ndarray) -> np.ndarray:
    """``den`` with zeros replaced by 1, for divisions whose result a mask then discards."""
    return np.where(den == 0, F32(1), den)


def _signed_absmax(x: np.ndarray) -> np.ndarray:
    """The value of largest magnitude of each block ``x [n, B]``, sign kept (C keeps the first)."""
    return np.take_along_axis(x, np.abs(x).argmax(axis=0)[None], axis=0)[0]


def make_qx_quants(x: np.ndarray, nmax: int, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric scale on the grid ``-nmax..nmax-1`` minimising ``sum w (x - s l)^2`` (rmse_type 1).

    Tries the 19 grids that map the largest-magnitude value to ``-(nmax + 0.1 i)``, i = -9..9, fits
    the least-squares scale for each one's codes and keeps the best. ``x``, ``w``: ``[B, n]``.
    Returns ``(scale [B], codes [B, n])`` with codes ``l + nmax`` in ``0..2 nmax - 1``; an all-zero
    block gets scale 0, codes 0.
    """
    x, w = _value_major(x, w)
    xmax = _signed_absmax(x)
    zero = np.abs(xmax) < GROUP_MAX_EPS
    xmax = np.where(zero, F32(1), xmax)

    def attempt(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        l = np.clip(np.rint(iscale * x), -nmax, nmax - 1)
        wl = w * l
        return l, sum0(w * x * l), sum0(wl * l)

    best_l, sumlx, suml2 = attempt(F32(-nmax) / xmax)
    scale = np.where(suml2 > 0, sumlx / _safe(suml2), F32(0))
    best = scale * sumlx
    for i in range(-9, 10):
        if i == 0:
            continue
        l, sumlx, suml2 = attempt(-(F32(nmax) + F32(0.1) * F32(i)) / xmax)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        best_l = np.where(better, l, best_l)
        scale = np.where(better, sumlx / _safe(suml2), scale)
        best = np.where(better, scale * sumlx, best)
    scale = np.where(zero, F32(0), scale)
    best_l = np.where(zero, F32(-nmax), best_l)
    return scale, (best_l + F32(nmax)).T


def _descend(x: np.ndarray, w: np.ndarray, L: np.ndarray, lo: int, hi: int, sumlx: np.ndarray,
             suml2: np.ndarray, need_sl2: bool) -> tuple[np.ndarray, np.ndarray]:
    """The coordinate descent of ``make_q3_quants``/``make_qp_quants``, in place on ``L [n, B]``.

    Each pass visits the codes in order and moves one to ``round(x sl2 / slx)`` (the best code for
    the fit of the others) when that raises ``sumlx^2 / suml2``. C stops a block's passes once one
    changes nothing; such a pass leaves the state as it was, so running every pass on every block
    gives the same result. ``need_sl2``: make_qp_quants also requires the other codes' ``sl2 > 0``
    before trying; make_q3_quants instead requires the new ``sl2 > 0``. Returns ``(sumlx, suml2)``.
    """
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # C's float overflow to inf, too
        for _ in range(N_DESCENT_PASSES):
            for i in range(x.shape[0]):
                xi, wi, li = x[i], w[i], L[i]
                slx = sumlx - wi * xi * li
                sl2 = suml2 - wi * li * li
                new_l = np.clip(np.rint(np.nan_to_num(xi * sl2 / slx)), lo, hi)
                slx_new = slx + wi * xi * new_l
                sl2_new = sl2 + wi * new_l * new_l
                take = ((slx > 0) & (new_l != li) & ((sl2 > 0) if need_sl2 else (sl2_new > 0))
                        & (slx_new * slx_new * suml2 > sumlx * sumlx * sl2_new))
                L[i] = np.where(take, new_l, li)
                sumlx = np.where(take, slx_new, sumlx)
                suml2 = np.where(take, sl2_new, suml2)
    return sumlx, suml2


def make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Q3_K's default search: round to the absmax grid, then move single codes while that raises
    the fit ``(sum w x l)^2 / sum w l^2`` with ``w = x^2`` (``_descend``). ``x``: ``[B, n]``.

    Returns ``(scale [B], codes [B, n])`` with codes ``l + nmax`` in ``0..2 nmax - 1``.
    """
    (x,) = _value_major(x)
    xmax = _signed_absmax(x)
    zero = np.abs(xmax) < GROUP_MAX_EPS
    L = np.clip(np.rint((F32(-nmax) / np.where(zero, F32(1), xmax)) * x), -nmax, nmax - 1)
    w = x * x
    sumlx, suml2 = _descend(x, w, L, -nmax, nmax - 1, sum0(w * x * L), sum0(w * L * L),
                            need_sl2=False)
    scale = np.where(zero | ~(suml2 > 0), F32(0), sumlx / _safe(suml2))
    L = np.where(zero, F32(-nmax), L)
    return scale, (L + F32(nmax)).T


def make_qkx_quants(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int,
                    use_mad: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scale and minimum for ``x ~ s l - m``, ``l`` in ``0..nmax``, minimising ``sum w |err|^p``.

    ``make_qkx2_quants``/``make_qkx3_quants``: start from the min..max grid, then for the
    ``nstep + 1`` grids with ``nmax + rmin + rdelta i`` steps over the current range, round, fit
    scale and minimum by weighted least squares (minimum kept <= 0), keep the fit whose weighted
    error (absolute when ``use_mad``, else squared) is lowest. As in C, the range of later grids
    starts at the best minimum found so far. The two C versions differ only in how they guard
    that range collapsing, which here is one ``clip``. ``x``, ``w``: ``[B, n]``.

    Returns ``(scale [B], the_min [B] >= 0, codes [B, n])``: the block decodes as ``scale * l - the_min``.
    """
    x, w = _value_major(x, w)
    xmax = x.max(axis=0)
    xmin = np.minimum(x.min(axis=0), F32(0))
    sum_w = sum0(w)
    sum_x = sum0(w * x)
    flat = xmax <= xmin

    def error(scale: np.ndarray, mn: np.ndarray, L: np.ndarray) -> np.ndarray:
        diff = scale * L + mn - x
        return sum0(w * (np.abs(diff) if use_mad else diff * diff))

    iscale = F32(nmax) / np.where(flat, F32(1), xmax - xmin)
    scale = F32(1) / iscale
    L = np.clip(np.rint(iscale * (x - xmin)), 0, nmax)
    best = error(scale, xmin, L)
    mn = xmin
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for step in range(nstep + 1):
            iscale = (F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / (xmax - mn)
            v = iscale * (x - mn)
            Laux = np.clip(np.rint(np.nan_to_num(v, nan=0.0, posinf=nmax, neginf=0.0)), 0, nmax)
            wl = w * Laux
            sum_l = sum0(wl)
            sum_l2 = sum0(wl * Laux)
            sum_xl = sum0(wl * x)
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / _safe(D)
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / _safe(D)
            positive_min = this_min > 0
            this_scale = np.where(positive_min, sum_xl / _safe(sum_l2), this_scale)
            this_min = np.where(positive_min, F32(0), this_min)
            cur = error(this_scale, this_min, Laux)
            better = (D > 0) & (cur < best)
            L = np.where(better, Laux, L)
            best = np.where(better, cur, best)
            scale = np.where(better, this_scale, scale)
            mn = np.where(better, this_min, mn)
    scale = np.where(flat, F32(0), scale)
    L = np.where(flat, F32(0), L)
    return scale, -np.where(flat, xmin, mn), L.T


def make_qp_quants(x: np.ndarray, nmax: int, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scale for non-negative values (a super-block's sub-scales or sub-minimums) on ``0..nmax``.

    Picks the best of 9 grids around ``max -> nmax`` by weighted squared error, then refines single
    codes (``_descend``) and returns the least-squares scale of the final codes. ``x``, ``w``:
    ``[B, n]``. Returns ``(scale [B], codes [B, n])``; a block whose maximum is below
    ``GROUP_MAX_EPS`` gets 0, 0.
    """
    x, w = _value_major(x, w)
    xmax = x.max(axis=0)
    zero = xmax < GROUP_MAX_EPS
    xmax = np.where(zero, F32(1), xmax)
    iscale = F32(nmax) / xmax
    diff = x - (F32(1) / iscale) * np.rint(iscale * x)
    best = sum0(w * diff * diff)
    for i in range(-4, 5):
        if i == 0:
            continue
        iscale_i = (F32(0.1) * F32(i) + F32(nmax)) / xmax
        diff = x - (F32(1) / iscale_i) * np.minimum(np.rint(iscale_i * x), nmax)
        mse = sum0(w * diff * diff)
        better = mse < best
        best = np.where(better, mse, best)
        iscale = np.where(better, iscale_i, iscale)
    L = np.clip(np.rint(iscale * x), 0, nmax)  # C has no lower clamp: x >= 0 there by construction
    sumlx, suml2 = _descend(x, w, L, 0, nmax, sum0(w * x * L), sum0(w * L * L), need_sl2=True)
    scale = np.where(zero | ~(suml2 > 0), F32(0), sumlx / _safe(suml2))
    return scale, np.where(zero, F32(0), L).T

"""llama.cpp's lattice-codebook block type IQ3_XXS: groups of 4 values coded as one of 256 grid points.

IQ3_XXS (3.06 bits per value) stores per 256 values a float16 ``d`` and, per sub-block of 32, eight
8-bit indices into a 256-point codebook of 4-vectors with entries ``2 l + 1`` (``l`` in 0..7, the
decoder's table writes ``4 (2 l + 1)`` and 62 for the top level), the signs of each 8 values as 7
bits (the eighth follows from even parity) and a 4-bit scale ``ls``: ``x = d (2 ls + 1) / 4 * grid * sign``.
The codebook is gguf-py's (``gguf.quants.IQ3_XXS.grid``), the decoder the tests hold these bytes to.

``fit_iq3_xxs(x, qw)`` ports ``quantize_row_iq3_xxs_impl`` (ggml-quants.c), vectorised over
sub-blocks: weights ``x^2`` (no imatrix) or ``qw sqrt(2 mean(x^2) + x^2)``; signs taken off (an odd
count of negatives flips the value of least weighted magnitude, as the parity bit demands); 31 trial
scales, each rounding every 4-vector to the lattice and, where that point is not in the codebook,
to the best of its precomputed nearest codebook points (``iq3xs_init_impl``'s neighbour lists:
every point within the two smallest squared distances) by weighted error; the trial with the best
least-squares fit wins, off-codebook groups are re-rounded on its scale, and the sub-block scales
are quantized to 4 bits against ``d = max / 31`` (stored times llama.cpp's fudge factor 1.0125).

A lattice block has no per-value code to choose once fitted, so its ``BlockFit`` is the whole block:
``params`` all its bytes, ``step`` the decoded values, one level (1): GPTQ (``gptq_blocks``) then
fits each block on the error-updated weights and feeds the block's errors forward.
"""

from __future__ import annotations

from functools import cache

import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import IQ3_XXS as _GGUF_IQ3_XXS
from gguf.quants import dequantize

from lowbit.gguf.scale_search import F32, BlockFit, seq_sum

GROUP_MAX_EPS_IQ3_XXS = F32(1e-8)
K_MAX_Q = 8  # lattice coordinates l in 0..7, value 2 l + 1
N_NEAREST_DISTANCES = 2  # iq3xs_init_impl's nwant for the 256-point grid
_SHIFTS = np.array([0, 3, 6, 9])  # a 4-vector's key: l_i << 3 i


@cache
def _codebook() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(grid float32 ``[256, 4]`` of ``2 l + 1``, map int ``[4096]`` key -> grid index or -1,
    neighbours int ``[4096, n]`` of each off-grid key, padded with -1), as ``iq3xs_init_impl``."""
    _GGUF_IQ3_XXS.init_grid()
    values = _GGUF_IQ3_XXS.grid.reshape(256, 4)
    levels = np.searchsorted(np.array(_GGUF_IQ3_XXS.grid_map, dtype=F32), values)  # l per coordinate
    grid = (2 * levels + 1).astype(F32)
    keys = (levels << _SHIFTS).sum(axis=1)
    kmap = np.full(4096, -1, dtype=np.int64)
    kmap[keys] = np.arange(256)
    every = (np.arange(4096)[:, None] >> _SHIFTS) & 7
    d2 = (((2 * every + 1)[:, None, :] - grid[None].astype(np.int64)) ** 2).sum(axis=2)  # [4096, 256]
    order = np.lexsort((np.broadcast_to(np.arange(256), d2.shape), d2), axis=1)  # by distance, then index
    sorted_d2 = np.take_along_axis(d2, order, axis=1)
    rank = np.concatenate([np.zeros((4096, 1), int), np.cumsum(np.diff(sorted_d2, axis=1) > 0, axis=1)], axis=1)
    keep = rank < N_NEAREST_DISTANCES
    width = int(keep.sum(axis=1).max())
    neighbours = np.where(keep, order, -1)[:, :width]
    neighbours[kmap >= 0] = -1
    return grid, kmap, neighbours


def _best_neighbour(xval: np.ndarray, waux: np.ndarray, scale: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """``iq3_find_best_neighbour`` for off-codebook groups: ``xval``, ``waux`` ``[M, 4]``, ``scale [M]``,
    ``keys [M]`` -> the grid index ``[M]`` of least ``sum waux (scale q - x)^2`` (the first on a tie)."""
    grid, _, neighbours = _codebook()
    cand = neighbours[keys]  # [M, n]
    q = grid[np.maximum(cand, 0)]  # [M, n, 4]
    diff = scale[:, None, None] * q - xval[:, None, :]
    t = waux[:, None, :] * diff * diff
    d2 = ((t[..., 0] + t[..., 1]) + t[..., 2]) + t[..., 3]
    d2 = np.where(cand >= 0, d2, np.inf)
    return np.take_along_axis(cand, d2.argmin(axis=1)[:, None], axis=1)[:, 0]


def _snap(xval: np.ndarray, waux: np.ndarray, iscale: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Round sub-blocks ``xval [N, 32]`` to the lattice at ``1 / iscale`` and then into the codebook.
    Returns (grid index ``[N, 8]``, whether the rounded point was in the codebook ``[N, 8]``)."""
    grid, kmap, _ = _codebook()
    l = np.clip(np.rint(F32(0.5) * (iscale[:, None] * xval - F32(1))), 0, K_MAX_Q - 1).astype(np.int64)
    keys = (l.reshape(-1, 8, 4) << _SHIFTS).sum(axis=2)
    index = kmap[keys]
    on_grid = index >= 0
    off = np.nonzero(~on_grid)
    if off[0].size:
        xv = xval.reshape(-1, 8, 4)[off]
        wa = waux.reshape(-1, 8, 4)[off]
        index[off] = _best_neighbour(xv, wa, scale[off[0]], keys[off])
    return index, on_grid


def _fit_sums(index: np.ndarray, xval: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(sum w x q, sum w q^2)`` in C's order for grid indices ``[N, 8]`` of sub-blocks ``[N, 32]``."""
    q = _codebook()[0][index].reshape(xval.shape)
    return seq_sum(w * xval * q), seq_sum(w * q * q)


def _signs(x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Magnitudes and 7-bit sign codes of each 8 values (``[N, 32]`` -> ``[N, 32]``, ``[N, 4]``): with an
    odd count of negatives the value of least ``w x^2`` keeps a flipped (negative) magnitude."""
    neg = (x < 0).reshape(-1, 4, 8)
    xval = np.abs(x).reshape(-1, 4, 8).copy()
    odd = neg.sum(axis=2) % 2 == 1
    imin = (w * x * x).reshape(-1, 4, 8).argmin(axis=2)
    flip = odd[..., None] & (np.arange(8) == imin[..., None])
    xval = np.where(flip, -xval, xval)
    bits = (neg ^ flip).astype(np.uint32) << np.arange(8, dtype=np.uint32)
    return xval.reshape(-1, 32), (bits.sum(axis=2) & 127).astype(np.uint32)


def _sub_block_scales(x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The per-sub-block search of ``quantize_row_iq3_xxs_impl``: sub-blocks ``x``, ``w`` ``[N, 32]``
    -> (scale ``[N]`` >= 0, grid indices ``[N, 8]``, sign codes ``[N, 4]``)."""
    waux = np.sqrt(w)
    xval, signs = _signs(x, w)
    mx = xval.max(axis=1)
    zero = mx < GROUP_MAX_EPS_IQ3_XXS
    mx = np.where(zero, F32(1), mx)
    n = len(x)
    best = np.zeros(n, F32)
    scale = mx / F32(2 * K_MAX_Q - 1)
    index = np.zeros((n, 8), np.int64)
    on_grid = np.ones((n, 8), bool)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for trial in range(-15, 16):
            iscale = (F32(2 * K_MAX_Q - 1) + F32(trial) * F32(0.2)) / mx
            idx, on = _snap(xval, waux, iscale, F32(1) / iscale)
            sumqx, sumq2 = _fit_sums(idx, xval, w)
            better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
            scale = np.where(better, sumqx / np.where(sumq2 > 0, sumq2, F32(1)), scale)
            best = np.where(better, scale * sumqx, best)
            index = np.where(better[:, None], idx, index)
            on_grid = np.where(better[:, None], on, on_grid)
        redo = (~on_grid).any(axis=1) & (scale > 0)
        if redo.any():
            r = np.nonzero(redo)[0]
            idx, _ = _snap(xval[r], waux[r], F32(1) / scale[r], scale[r])
            idx = np.where(on_grid[r], index[r], idx)
            index[r] = idx
            sumqx, sumq2 = _fit_sums(idx, xval[r], w[r])
            scale[r] = np.where(sumq2 > 0, sumqx / np.where(sumq2 > 0, sumq2, F32(1)), scale[r])
    negative = scale < 0
    scale = np.abs(scale)
    signs = np.where(negative[:, None], ~signs & 127, signs)
    scale = np.where(zero, F32(0), scale)
    index = np.where(zero[:, None], 0, index)
    signs = np.where(zero[:, None], 0, signs)
    return scale, index, signs


def fit_iq3_xxs(x: np.ndarray, qw: np.ndarray | None) -> BlockFit:
    """IQ3_XXS, 98 bytes per 256 values: float16 ``d``, ``qs[64]`` grid indices, 8 uint32 of four 7-bit
    sign codes and a 4-bit scale. ``x``, ``qw``: ``[B, 256]``; see the module docstring."""
    B = x.shape[0]
    if qw is None:
        w = x * x
    else:
        sigma2 = F32(2) * seq_sum(x * x) / F32(256)
        w = qw * np.sqrt(sigma2[:, None] + x * x)
    scales, index, signs = _sub_block_scales(x.reshape(-1, 32), w.reshape(-1, 32))
    scales = scales.reshape(B, 8)
    max_scale = scales.max(axis=1)
    d = max_scale / F32(31)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.where(d > 0, F32(1) / np.where(d > 0, d, F32(1)), F32(0))
    ls = np.clip(np.rint(F32(0.5) * (inv[:, None] * scales - F32(1))), 0, 15).astype(np.uint32)
    words = (signs.reshape(B, 8, 4) << np.array([0, 7, 14, 21], dtype=np.uint32)).sum(axis=2, dtype=np.uint32)
    words = words | (ls << np.uint32(28))
    blank = max_scale == 0
    h = np.where(blank, F32(0), d * F32(1.0125)).astype(np.float16)
    data = np.concatenate([h.reshape(-1, 1).view(np.uint8), index.reshape(B, 64).astype(np.uint8),
                           words.astype("<u4").view(np.uint8).reshape(B, 32)], axis=1)
    data[blank] = 0
    return whole_block_fit(data, GGMLQuantizationType.IQ3_XXS)


def whole_block_fit(data: np.ndarray, qtype: GGMLQuantizationType) -> BlockFit:
    """The ``BlockFit`` of finished blocks ``data [B, type_size]``: every byte a parameter, the decoded
    values as steps of a one-level grid, so that GPTQ takes each value as it is."""
    values = dequantize(data, qtype).reshape(data.shape[0], -1).astype(F32)
    return BlockFit(data, values, np.zeros_like(values), np.zeros(values.shape, np.uint8), 0, 0,
                    np.ones(1, F32))


def pack_no_codes(codes: np.ndarray) -> np.ndarray:
    """A lattice block's code bytes live in its parameters (``whole_block_fit``): none here."""
    return np.zeros((codes.shape[0], 0), np.uint8)

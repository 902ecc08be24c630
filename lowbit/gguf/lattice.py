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

from dataclasses import dataclass
from functools import cache

import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import IQ2_XS as _GGUF_IQ2_XS
from gguf.quants import IQ3_XXS as _GGUF_IQ3_XXS
from gguf.quants import dequantize

from lowbit.gguf.scale_search import F32, BlockFit, seq_sum

@dataclass(frozen=True)
class Lattice:
    """One lattice type's constants in ggml-quants.c.

    Fields: ``table`` the gguf-py class holding the codebook; ``dim`` values per codebook vector;
    ``bits`` per lattice coordinate in a key; ``levels`` coordinates ``l`` in ``0..levels-1``;
    ``nwant`` distinct distances kept in each neighbour list; ``sub`` values per sub-block scale;
    ``trials`` the trial scales ``(2 levels - 1 + i step) / max`` for i in ``-trials..trials``;
    ``eps`` the smallest ``max`` still quantized; ``sigma_factor`` the imatrix weights'
    ``sigma2 = factor mean(x^2)``.
    """

    table: type
    dim: int
    bits: int
    levels: int
    nwant: int
    sub: int
    trials: int
    trial_step: float
    eps: float
    sigma_factor: float

    @property
    def shifts(self) -> np.ndarray:
        return np.arange(self.dim) * self.bits


IQ3_XXS = Lattice(_GGUF_IQ3_XXS, dim=4, bits=3, levels=8, nwant=2, sub=32, trials=15, trial_step=0.2,
                  eps=1e-8, sigma_factor=2.0)
IQ2_XS = Lattice(_GGUF_IQ2_XS, dim=8, bits=2, levels=3, nwant=2, sub=16, trials=9, trial_step=0.1,
                 eps=1e-15, sigma_factor=1.0)


@cache
def _codebook(lat: Lattice) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(grid float32 ``[G, dim]`` of ``2 l + 1``, map int key -> grid index or -1, neighbours int
    ``[keys, n]`` of each off-grid key, padded with -1), as ``iq3xs_init_impl``/``iq2xs_init_impl``."""
    lat.table.init_grid()
    values = lat.table.grid.reshape(-1, lat.dim)
    coords = np.searchsorted(np.array(lat.table.grid_map, dtype=F32), values)  # l per coordinate
    grid = (2 * coords + 1).astype(F32)
    size = 1 << (lat.bits * lat.dim)
    kmap = np.full(size, -1, dtype=np.int64)
    kmap[(coords << lat.shifts).sum(axis=1)] = np.arange(len(grid))
    every = np.arange(size)
    point = (every[:, None] >> lat.shifts) & ((1 << lat.bits) - 1)
    asked = (point < lat.levels).all(axis=1) & (kmap < 0)  # keys a rounded vector can have, not in the codebook
    keys = every[asked]
    d2 = (((2 * point[asked] + 1)[:, None, :] - grid[None].astype(np.int64)) ** 2).sum(axis=2)  # [K, G]
    order = np.lexsort((np.broadcast_to(np.arange(len(grid)), d2.shape), d2), axis=1)  # by distance, then index
    sorted_d2 = np.take_along_axis(d2, order, axis=1)
    rank = np.concatenate([np.zeros((len(keys), 1), int), np.cumsum(np.diff(sorted_d2, axis=1) > 0, axis=1)], axis=1)
    keep = rank < lat.nwant
    width = int(keep.sum(axis=1).max())
    neighbours = np.full((size, width), -1, dtype=np.int64)
    neighbours[keys] = np.where(keep, order, -1)[:, :width]
    return grid, kmap, neighbours


def _best_neighbour(lat: Lattice, xval: np.ndarray, waux: np.ndarray, scale: np.ndarray,
                    keys: np.ndarray) -> np.ndarray:
    """``iq*_find_best_neighbour`` for off-codebook vectors: ``xval``, ``waux`` ``[M, dim]``, ``scale [M]``,
    ``keys [M]`` -> the grid index ``[M]`` of least ``sum waux (scale q - x)^2`` (the first on a tie).

    Neighbour lists differ in length (IQ2_XS: 30 on average, up to 292), so vectors are scored in
    groups of similar list length, each padded only to its own longest list."""
    grid, _, neighbours = _codebook(lat)
    count = (neighbours[keys] >= 0).sum(axis=1)
    best = np.empty(len(keys), np.int64)
    low = 0
    for width in (4, 8, 16, 32, 64, 128, neighbours.shape[1]):
        sel = np.nonzero((count > low) & (count <= width))[0]
        low = width
        if sel.size == 0:
            continue
        cand = neighbours[keys[sel], :width]  # [m, width]
        q = grid[np.maximum(cand, 0)]  # [m, width, dim]
        diff = scale[sel, None, None] * q - xval[sel, None, :]
        t = waux[sel, None, :] * diff * diff
        d2 = t[..., 0]
        for i in range(1, lat.dim):  # C's order
            d2 = d2 + t[..., i]
        d2 = np.where(cand >= 0, d2, np.inf)
        best[sel] = np.take_along_axis(cand, d2.argmin(axis=1)[:, None], axis=1)[:, 0]
    return best


def _snap(lat: Lattice, xval: np.ndarray, waux: np.ndarray, iscale: np.ndarray,
          scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Round sub-blocks ``xval [N, sub]`` to the lattice at ``1 / iscale`` and then into the codebook.
    Returns (grid index ``[N, sub / dim]``, whether the rounded point was in the codebook)."""
    _, kmap, _ = _codebook(lat)
    l = np.clip(np.rint(F32(0.5) * (iscale[:, None] * xval - F32(1))), 0, lat.levels - 1).astype(np.int64)
    keys = (l.reshape(len(xval), -1, lat.dim) << lat.shifts).sum(axis=2)
    index = kmap[keys]
    on_grid = index >= 0
    off = np.nonzero(~on_grid)
    if off[0].size:
        xv = xval.reshape(len(xval), -1, lat.dim)[off]
        wa = waux.reshape(len(xval), -1, lat.dim)[off]
        index[off] = _best_neighbour(lat, xv, wa, scale[off[0]], keys[off])
    return index, on_grid


def _fit_sums(lat: Lattice, index: np.ndarray, xval: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(sum w x q, sum w q^2)`` in C's order for grid indices of sub-blocks ``xval [N, sub]``."""
    q = _codebook(lat)[0][index].reshape(xval.shape)
    return seq_sum(w * xval * q), seq_sum(w * q * q)


def _signs(x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Magnitudes and 7-bit sign codes of each 8 values (``[N, n]`` -> ``[N, n]``, ``[N, n / 8]``): with
    an odd count of negatives the value of least ``w x^2`` keeps a flipped (negative) magnitude."""
    neg = (x < 0).reshape(len(x), -1, 8)
    xval = np.abs(x).reshape(neg.shape)
    odd = neg.sum(axis=2) % 2 == 1
    imin = (w * x * x).reshape(neg.shape).argmin(axis=2)
    flip = odd[..., None] & (np.arange(8) == imin[..., None])
    xval = np.where(flip, -xval, xval)
    bits = (neg ^ flip).astype(np.uint32) << np.arange(8, dtype=np.uint32)
    return xval.reshape(x.shape), (bits.sum(axis=2) & 127).astype(np.uint32)


def _sub_block_scales(lat: Lattice, x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The per-sub-block search of ``quantize_row_iq3_xxs_impl``/``iq2_xs_impl``: sub-blocks ``x``,
    ``w`` ``[N, sub]`` -> (scale ``[N]`` >= 0, grid indices ``[N, sub / dim]``, sign codes ``[N, sub / 8]``)."""
    waux = np.sqrt(w)
    xval, signs = _signs(x, w)
    mx = xval.max(axis=1)
    zero = mx < F32(lat.eps)
    mx = np.where(zero, F32(1), mx)
    n, top = len(x), F32(2 * lat.levels - 1)
    best = np.zeros(n, F32)
    scale = mx / top
    index = np.zeros((n, lat.sub // lat.dim), np.int64)
    on_grid = np.ones(index.shape, bool)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for trial in range(-lat.trials, lat.trials + 1):
            iscale = (top + F32(trial) * F32(lat.trial_step)) / mx
            idx, on = _snap(lat, xval, waux, iscale, F32(1) / iscale)
            sumqx, sumq2 = _fit_sums(lat, idx, xval, w)
            better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
            scale = np.where(better, sumqx / np.where(sumq2 > 0, sumq2, F32(1)), scale)
            best = np.where(better, scale * sumqx, best)
            index = np.where(better[:, None], idx, index)
            on_grid = np.where(better[:, None], on, on_grid)
        redo = (~on_grid).any(axis=1) & (scale > 0)
        if redo.any():
            r = np.nonzero(redo)[0]
            idx, _ = _snap(lat, xval[r], waux[r], F32(1) / scale[r], scale[r])
            idx = np.where(on_grid[r], index[r], idx)
            index[r] = idx
            sumqx, sumq2 = _fit_sums(lat, idx, xval[r], w[r])
            scale[r] = np.where(sumq2 > 0, sumqx / np.where(sumq2 > 0, sumq2, F32(1)), scale[r])
    negative = scale < 0
    scale = np.abs(scale)
    signs = np.where(negative[:, None], ~signs & 127, signs)
    scale = np.where(zero, F32(0), scale)
    index = np.where(zero[:, None], 0, index)
    signs = np.where(zero[:, None], 0, signs)
    return scale, index, signs


def _weights(lat: Lattice, x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    """``x^2``, or ``qw sqrt(sigma2 + x^2)`` with ``sigma2 = factor sum(x^2) / 256`` over the super-block."""
    if qw is None:
        return x * x
    sigma2 = F32(lat.sigma_factor) * seq_sum(x * x) / F32(256) if lat.sigma_factor != 1 else seq_sum(x * x) / F32(256)
    return qw * np.sqrt(sigma2[:, None] + x * x)


def _super_scale(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(``d = max / 31`` ``[B]``, 4-bit sub-block scales ``ls`` with ``scale ~ d (2 ls + 1)`` ``[B, S]``)."""
    d = scales.max(axis=1) / F32(31)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.where(d > 0, F32(1) / np.where(d > 0, d, F32(1)), F32(0))
    return d, np.clip(np.rint(F32(0.5) * (inv[:, None] * scales - F32(1))), 0, 15).astype(np.uint32)


def fit_iq3_xxs(x: np.ndarray, qw: np.ndarray | None) -> BlockFit:
    """IQ3_XXS, 98 bytes per 256 values: float16 ``d``, ``qs[64]`` grid indices, 8 uint32 of four 7-bit
    sign codes and a 4-bit scale. ``x``, ``qw``: ``[B, 256]``; weights ``x^2`` without ``qw``."""
    B = x.shape[0]
    scales, index, signs = _sub_block_scales(IQ3_XXS, x.reshape(-1, 32), _weights(IQ3_XXS, x, qw).reshape(-1, 32))
    d, ls = _super_scale(scales.reshape(B, 8))
    words = (signs.reshape(B, 8, 4) << np.array([0, 7, 14, 21], dtype=np.uint32)).sum(axis=2, dtype=np.uint32)
    words = words | (ls << np.uint32(28))
    blank = d == 0
    h = np.where(blank, F32(0), d * F32(1.0125)).astype(np.float16)  # llama.cpp's fudge factor
    data = np.concatenate([h.reshape(-1, 1).view(np.uint8), index.reshape(B, 64).astype(np.uint8),
                           words.astype("<u4").view(np.uint8).reshape(B, 32)], axis=1)
    data[blank] = 0
    return whole_block_fit(data, GGMLQuantizationType.IQ3_XXS)


def fit_iq2_xs(x: np.ndarray, qw: np.ndarray | None) -> BlockFit:
    """IQ2_XS, 74 bytes per 256 values: float16 ``d``, 32 uint16 (a 9-bit index into the 512-point
    codebook of 8-vectors, a 7-bit sign code above it), ``scales[8]`` (two 4-bit scales per byte).
    ``x``, ``qw``: ``[B, 256]``. llama.cpp refuses IQ2_XS without an imatrix; here a missing ``qw``
    is a flat one (every column equally important)."""
    B = x.shape[0]
    qw = np.ones_like(x) if qw is None else qw
    scales, index, signs = _sub_block_scales(IQ2_XS, x.reshape(-1, 16), _weights(IQ2_XS, x, qw).reshape(-1, 16))
    d, ls = _super_scale(scales.reshape(B, 16))
    words = (index.reshape(B, 32) | (signs.reshape(B, 32) << 9)).astype("<u2")
    packed = (ls[:, 0::2] | (ls[:, 1::2] << 4)).astype(np.uint8)
    blank = d == 0
    data = np.concatenate([d.astype(np.float16).reshape(-1, 1).view(np.uint8), words.view(np.uint8).reshape(B, 64),
                           packed], axis=1)
    data[blank] = 0
    return whole_block_fit(data, GGMLQuantizationType.IQ2_XS)


def whole_block_fit(data: np.ndarray, qtype: GGMLQuantizationType) -> BlockFit:
    """The ``BlockFit`` of finished blocks ``data [B, type_size]``: every byte a parameter, the decoded
    values as steps of a one-level grid, so that GPTQ takes each value as it is."""
    values = dequantize(data, qtype).reshape(data.shape[0], -1).astype(F32)
    return BlockFit(data, values, np.zeros_like(values), np.zeros(values.shape, np.uint8), 0, 0,
                    np.ones(1, F32))


def pack_no_codes(codes: np.ndarray) -> np.ndarray:
    """A lattice block's code bytes live in its parameters (``whole_block_fit``): none here."""
    return np.zeros((codes.shape[0], 0), np.uint8)

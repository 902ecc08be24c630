"""llama.cpp's table-grid block types: IQ4_NL, IQ4_XS (a non-uniform 16-level grid) and MXFP4.

In these types a 4-bit code indexes a fixed table of levels rather than counting steps:
``x ~ d * table[code]``. IQ4_NL and IQ4_XS share llama.cpp's ``kvalues_iq4nl`` (16 int8 levels,
denser near zero, where bell-shaped weights are); MXFP4 is OCP microscaling FP4: E2M1 values
(``kvalues_mxfp4``, doubled to integers) under one power-of-two scale per 32 values (E8M0).
The tables are gguf-py's (``gguf.quants.IQ4_NL.kvalues``, ``MXFP4.kvalues``), the reader the
tests hold these bytes to.

Each ``fit_*(x, qw)`` takes blocks ``x`` float32 ``[B, bs]`` and optional importance ``qw`` (the
imatrix of each value's input column) and returns a ``BlockFit`` whose ``levels`` is the table;
``pack_*_codes`` lays the codes out. Ported from ggml-quants.c: ``quantize_row_iq4_nl_impl`` as
``quantize_iq4_nl`` / ``quantize_iq4_xs`` call it (what ``llama-quantize`` runs, with or without an
imatrix: 15 trial scales around ``max / -127``, each scored by the weighted least-squares fit
``(sum w q x)^2 / sum w q^2``; weights ``x^2`` without an imatrix, ``qw sqrt(sigma2 + x^2)`` with
one, ``sigma2`` twice the mean square of the block (IQ4_NL) or super-block (IQ4_XS)), and
``quantize_row_mxfp4_ref`` (the exponent of the block's largest magnitude minus 2, the nearest
table value; llama.cpp's MXFP4 ignores the imatrix, and so does this). Sums run in C's order
(``seq_sum``) so near-ties break as C's do and the bytes match libggml's.
"""

from __future__ import annotations

import numpy as np
from gguf.quants import IQ4_NL as _GGUF_IQ4_NL
from gguf.quants import MXFP4 as _GGUF_MXFP4

from lowbit.gguf.scale_search import F32, GROUP_MAX_EPS, BlockFit, seq_sum

IQ4_LEVELS = np.array(_GGUF_IQ4_NL.kvalues, dtype=F32)  # -127 .. 113, ascending
MXFP4_LEVELS = np.array(_GGUF_MXFP4.kvalues, dtype=F32)  # 0, 1, 2, 3, 4, 6, 8, 12, then their negatives
N_TRY = 7  # quantize_iq4_nl/xs: trial scales (itry - 127) / max for itry in -7..7


def best_index(levels: np.ndarray, x: np.ndarray) -> np.ndarray:
    """ggml's ``best_index_int8``: index of the level of ascending ``levels [16]`` nearest ``x``
    (any shape), the upper one on a tie, computed in float32 as C does."""
    n = len(levels)
    mu = np.clip(np.searchsorted(levels, x, side="right"), 1, n - 1)
    lower, upper = levels[mu - 1], levels[mu]
    idx = np.where(x - lower < upper - x, mu - 1, mu)
    return np.where(x <= levels[0], 0, np.where(x >= levels[-1], n - 1, idx)).astype(np.uint8)


def _fit_scales(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The per-block scale search of ``quantize_row_iq4_nl_impl`` (``ntry = 7``) on blocks of 32:
    ``x``, ``w`` ``[B, 32]`` -> the best least-squares scale ``[B]`` (0 for an all-zero block)."""
    idx = np.abs(x).argmax(axis=1)[:, None]
    mx = np.take_along_axis(x, idx, axis=1)[:, 0]
    zero = np.abs(mx) < GROUP_MAX_EPS
    mx = np.where(zero, F32(1), mx)

    def attempt(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        q = IQ4_LEVELS[best_index(IQ4_LEVELS, iscale[:, None] * x)]
        wq = w * q
        return seq_sum(wq * x), seq_sum(wq * q)

    d = -mx / IQ4_LEVELS[0]
    sumqx, sumq2 = attempt(F32(1) / d)
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.where(sumq2 > 0, sumqx / np.where(sumq2 > 0, sumq2, F32(1)), F32(0))
        best = d * sumqx
        for itry in range(-N_TRY, N_TRY + 1):
            sumqx, sumq2 = attempt((F32(itry) + IQ4_LEVELS[0]) / mx)
            better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
            d = np.where(better, sumqx / np.where(sumq2 > 0, sumq2, F32(1)), d)
            best = np.where(better, d * sumqx, best)
    return np.where(zero, F32(0), d)


def _iq4_weights(x: np.ndarray, qw: np.ndarray | None, span: int) -> np.ndarray:
    """Error weights ``[B, n]``: ``x^2``, or ``qw sqrt(sigma2 + x^2)`` with ``sigma2 = 2 mean(x^2)``
    over each ``span`` values (the block for IQ4_NL, the super-block for IQ4_XS)."""
    if qw is None:
        return x * x
    xs = x.reshape(-1, span)
    sigma2 = seq_sum(xs * xs) * (F32(2) / F32(span))
    return (qw.reshape(-1, span) * np.sqrt(sigma2[:, None] + xs * xs)).reshape(x.shape)


def _f16(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    h = v.astype(np.float16)
    return h.reshape(-1, 1).view(np.uint8), h.astype(F32)


def fit_iq4_nl(x: np.ndarray, qw: np.ndarray | None) -> BlockFit:
    """IQ4_NL, 18 bytes per 32 values: float16 ``d``, ``qs[16]``; ``x ~ d kvalues[code]``.

    As C: the codes are the nearest levels of ``x / d`` with the unrounded ``d``, which is then
    stored as float16.
    """
    d = _fit_scales(x, _iq4_weights(x, qw, 32))
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, F32(1) / np.where(d != 0, d, F32(1)), F32(0))
    codes = best_index(IQ4_LEVELS, inv[:, None] * x)
    d_bytes, step = _f16(d)
    return BlockFit(d_bytes, step[:, None], np.zeros((len(d), 1), F32), codes, 0, 15, IQ4_LEVELS)


def fit_iq4_xs(x: np.ndarray, qw: np.ndarray | None) -> BlockFit:
    """IQ4_XS, 136 bytes per 256 values: float16 ``d``, ``scales_h`` (uint16), ``scales_l[4]``,
    ``qs[128]``; eight sub-blocks of 32, ``x ~ d (ls - 32) kvalues[code]``, ``ls`` 6 bits.

    The sub-block scales of the search are quantized against ``d = -(the largest in magnitude) / 32``;
    as C, the 6-bit scales and the codes are computed from the float32 ``d``, which is stored as float16.
    """
    B = x.shape[0]
    xs = x.reshape(-1, 32)
    scales = _fit_scales(xs, _iq4_weights(x, qw, 256).reshape(-1, 32)).reshape(B, 8)
    idx = np.abs(scales).argmax(axis=1)[:, None]
    d = -np.take_along_axis(scales, idx, axis=1)[:, 0] / F32(32)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, F32(1) / np.where(d != 0, d, F32(1)), F32(0))
    ls = np.clip(np.rint(inv[:, None] * scales), -32, 31)
    dl = d[:, None] * ls
    with np.errstate(divide="ignore"):
        idl = np.where(dl != 0, F32(1) / np.where(dl != 0, dl, F32(1)), F32(0))
    codes = best_index(IQ4_LEVELS, idl.reshape(-1, 1) * xs).reshape(B, 256)
    d_bytes, d16 = _f16(d)
    lsu = (ls + 32).astype(np.uint16)
    scales_h = np.bitwise_or.reduce((lsu >> 4) << (2 * np.arange(8, dtype=np.uint16)), axis=1)
    lo = (lsu & 0x0F).astype(np.uint8)
    scales_l = lo[:, 0::2] | (lo[:, 1::2] << 4)
    params = np.concatenate([d_bytes, scales_h.astype("<u2").reshape(-1, 1).view(np.uint8), scales_l], axis=1)
    return BlockFit(params, d16[:, None] * ls, np.zeros((B, 8), F32), codes, 0, 15, IQ4_LEVELS)


def pack_nibble_codes(codes: np.ndarray) -> np.ndarray:
    """``qs`` of IQ4_NL, IQ4_XS and MXFP4 from codes uint8 ``[B, n]``: per 32 values, 16 bytes with
    value ``j`` in the low nibble and ``j + 16`` in the high one."""
    q = codes.reshape(codes.shape[0], -1, 2, 16)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(codes.shape[0], -1)


def _e8m0_half(e: np.ndarray) -> np.ndarray:
    """ggml's ``GGML_E8M0_TO_FP32_HALF``: ``2^(e - 128)`` as float32, subnormal for ``e < 2``."""
    e = e.astype(np.uint32)
    bits = np.where(e < 2, np.uint32(0x00200000) << e, (np.maximum(e, 1) - 1) << np.uint32(23))
    return bits.astype(np.uint32).view(F32)


def fit_mxfp4(x: np.ndarray, qw: np.ndarray | None) -> BlockFit:
    """MXFP4, 17 bytes per 32 values: E8M0 exponent ``e``, ``qs[16]``; ``x ~ 2^(e - 128) kvalues[code]``.

    ``e = floor(log2(max |x|)) - 2 + 127`` (the largest magnitude lands in 4..8 of the doubled E2M1
    table, whose top is 12), each code the table entry nearest ``x`` (the first on a tie). The
    importance is ignored, as llama.cpp's ``quantize_mxfp4`` does: the scale has no freedom to weigh.
    """
    amax = np.abs(x).max(axis=1)
    with np.errstate(divide="ignore"):
        lg = np.log2(amax.astype(np.float64)).astype(F32)  # log2f, correctly rounded
    e = np.where(amax > 0, np.clip(np.floor(lg) - 2 + 127, 0, 255), 0).astype(np.uint8)
    d = _e8m0_half(e)
    err = np.abs(MXFP4_LEVELS[None, None, :] * d[:, None, None] - x[:, :, None])
    codes = err.argmin(axis=2).astype(np.uint8)
    return BlockFit(e[:, None], d[:, None], np.zeros((len(d), 1), F32), codes, 0, 15, MXFP4_LEVELS)

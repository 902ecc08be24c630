"""llama.cpp's k-quants (Q2_K .. Q6_K): super-blocks of 256 values with quantized sub-block scales.

Each ``fit_qN_k(x, qw)`` takes super-blocks ``x`` float32 ``[B, 256]`` and, optionally, the
importance of each value ``qw`` float32 ``[B, 256]`` (the imatrix entry of its input column), and
returns a ``BlockFit``: the parameter bytes, the grid they decode to, and the codes. ``pack_qN_k_codes``
lays codes ``[B, 256]`` out as the block's code bytes; ``blocks`` puts parameter and code bytes
together in ggml-common.h's ``block_qN_K`` byte layout.

Without ``qw`` each follows ggml-quants.c's ``quantize_row_qN_K_ref`` (what ``llama-quantize`` runs
without an imatrix); with ``qw`` it follows ``quantize_row_qN_K_impl``. Both end the same way: the
sub-block scales are themselves quantized (4, 6 or 8 bits) against a float16 super-block scale,
then every code is re-rounded against the scales as stored.
Deviation: where C leaves a code as the search found it (a sub-block whose stored scale is 0, so
the code does not change the decoded value), so do we; codes are clamped into range where C
would wrap a garbage integer in a degenerate block.
"""

from __future__ import annotations

import numpy as np

from lowbit.gguf.scale_search import (
    F32,
    GROUP_MAX_EPS,
    BlockFit,
    make_q3_quants,
    make_qkx_quants,
    make_qp_quants,
    make_qx_quants,
    seq_sum,
)

QK_K = 256


def _f16(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(stored bytes uint8 ``[B, 2]``, value as float32 ``[B]``) of float16 super-block scales."""
    h = v.astype(np.float16)
    return h.reshape(-1, 1).view(np.uint8), h.astype(F32)


def _sigma_weights(x: np.ndarray, qw: np.ndarray, factor: float) -> np.ndarray:
    """llama.cpp's imatrix error weights ``qw * sqrt(sigma2 + x^2)``, ``sigma2 = factor * mean(x^2)``
    over the super-block: importance of the input column times a magnitude term, so large weights
    of an important column count most."""
    sigma2 = F32(factor) * seq_sum(x * x)[:, None] / F32(QK_K)
    return qw * np.sqrt(sigma2 + x * x)


def _requantize(x: np.ndarray, L: np.ndarray, d: np.ndarray, m: np.ndarray | None, lo: int,
                hi: int) -> np.ndarray:
    """Nearest codes of ``x [B, S, n]`` for sub-block steps ``d`` and minimums ``m`` ``[B, S]``
    as stored (``x ~ d l - m``, ``l`` in ``lo..hi``, codes ``l - lo``); keeps ``L`` where ``d`` is 0."""
    d3 = d[..., None]
    num = x if m is None else x + m[..., None]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        l = np.clip(np.rint(num / np.where(d3 == 0, F32(1), d3)), lo, hi) - lo
    return np.where(d3 == 0, L.reshape(x.shape), l).astype(np.uint8)


def _pack_2bit(L: np.ndarray) -> np.ndarray:
    """``qs`` of Q2_K/Q3_K: uint8 codes ``[B, 256]`` -> ``[B, 64]``; in each half of 128 values,
    byte ``l`` holds values ``l, l+32, l+64, l+96`` from the low bits up."""
    q = L.reshape(-1, 2, 4, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(-1, 64)


def _pack_nibbles(L: np.ndarray) -> np.ndarray:
    """``qs`` of Q4_K/Q5_K: low 4 bits of codes ``[B, 256]`` -> ``[B, 128]``; each 64 values give
    32 bytes, value ``l`` in the low nibble and ``l + 32`` in the high one."""
    q = (L & 0x0F).reshape(-1, 4, 2, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)


def _pack_scales_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and eight 6-bit minimums ``[B, 8]`` -> the 12 ``scales`` bytes of
    Q4_K/Q5_K (``get_scale_min_k4``): bytes 0-3 and 4-7 hold scales/mins 0-3 in their low 6 bits
    and the top 2 bits of scales/mins 4-7 in bits 6-7; bytes 8-11 hold the low nibbles of 4-7."""
    ls, lm = ls.astype(np.uint8), lm.astype(np.uint8)
    out = np.empty((ls.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    out[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:] & 0x0F) | ((lm[:, 4:] & 0x0F) << 4)
    return out


def _max_to_scale(values: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``_ref`` way of quantizing non-negative sub-block scales: map the largest onto
    ``levels`` and round. Returns (codes ``[B, S]``, super-block scale ``[B]``)."""
    vmax = np.maximum(values.max(axis=1), F32(0))
    inv = np.where(vmax > 0, F32(levels) / np.where(vmax > 0, vmax, F32(1)), F32(0))
    return np.clip(np.rint(inv[:, None] * values), 0, levels), vmax / F32(levels)


def fit_q2_k(x: np.ndarray, qw: np.ndarray | None) -> BlockFit:
    """Q2_K, 84 bytes: ``scales[16]`` (4-bit scale | 4-bit min << 4), ``qs[64]``, ``d``, ``dmin``.

    16 sub-blocks of 16 values, ``x ~ d sc l - dmin m``, ``l`` in 0..3. Without ``qw`` the error is
    weighted by ``|x|`` and measured as absolute error (as C); with ``qw`` by ``qw sqrt(mean(x^2) + x^2)``
    (no factor 2 on the mean here, unlike Q3_K..Q5_K), squared.
    """
    xs = x.reshape(-1, 16)
    if qw is None:
        scales, mins, L = make_qkx_quants(xs, np.abs(xs), 3, -0.5, 0.1, 15, use_mad=True)
        Ls, d = _max_to_scale(scales.reshape(-1, 16), 15)
        Lm, dmin = _max_to_scale(mins.reshape(-1, 16), 15)
    else:
        w = _sigma_weights(x, qw, 1.0).reshape(-1, 16)
        scales, mins, L = make_qkx_quants(xs, w, 3, -0.9, 0.05, 36, use_mad=False)
        sw = seq_sum(w).reshape(-1, 16)
        d, Ls = make_qp_quants(scales.reshape(-1, 16), 15, sw)
        dmin, Lm = make_qp_quants(mins.reshape(-1, 16), 15, sw)
    d_bytes, d = _f16(d)
    dmin_bytes, dmin = _f16(dmin)
    step, the_min = d[:, None] * Ls, dmin[:, None] * Lm
    codes = _requantize(x.reshape(-1, 16, 16), L, step, the_min, 0, 3)
    sc = Ls.astype(np.uint8) | (Lm.astype(np.uint8) << 4)
    return BlockFit(np.concatenate([sc, d_bytes, dmin_bytes], axis=1), step, -the_min, codes.reshape(-1, QK_K), 0, 3)


def pack_q2_k_codes(codes: np.ndarray) -> np.ndarray:
    """Q2_K's ``qs[64]`` (between ``scales`` and ``d``) from codes uint8 ``[B, 256]`` in 0..3."""
    return _pack_2bit(codes)


def fit_q3_k(x: np.ndarray, qw: np.ndarray | None) -> BlockFit:
    """Q3_K, 110 bytes: ``hmask[32]``, ``qs[64]``, ``scales[12]`` (16 signed 6-bit), ``d``.

    16 sub-blocks of 16 values, ``x ~ d (sc - 32) l``, ``l`` in -4..3 (2 low bits in ``qs``, the
    third in ``hmask``, set when ``l >= 0``). Without ``qw``: ``make_q3_quants`` per sub-block and the
    largest-magnitude sub-scale mapped to -32; with ``qw``: ``make_qx_quants`` weighted by
    ``qw sqrt(2 mean(x^2) + x^2)``, and the sub-scales fitted with ``make_qx_quants`` too.
    """
    xs = x.reshape(-1, 16)
    if qw is None:
        scales, L = make_q3_quants(xs, 4)
        scales = scales.reshape(-1, 16)
        smax = _signed_absmax_scale(scales)
        ok = smax != 0
        iscale = np.where(ok, F32(-32) / np.where(ok, smax, F32(1)), F32(0))
        Ls = np.where(ok[:, None], np.clip(np.rint(iscale[:, None] * scales), -32, 31) + 32, F32(0))
        d = np.where(ok, F32(1) / np.where(ok, iscale, F32(1)), F32(0))
    else:
        w = _sigma_weights(x, qw, 2.0).reshape(-1, 16)
        scales, L = make_qx_quants(xs, 4, w)
        d, Ls = make_qx_quants(scales.reshape(-1, 16), 32, seq_sum(w).reshape(-1, 16))
    d_bytes, d = _f16(d)
    step = d[:, None] * (Ls - 32)
    codes = _requantize(x.reshape(-1, 16, 16), L, step, None, -4, 3).reshape(-1, QK_K)
    params = np.concatenate([_pack_scales_q3(Ls.astype(np.uint8)), d_bytes], axis=1)
    return BlockFit(params, step, np.zeros_like(step), codes, -4, 3)


def pack_q3_k_codes(codes: np.ndarray) -> np.ndarray:
    """Q3_K's ``hmask[32]`` and ``qs[64]`` (before ``scales``) from codes uint8 ``[B, 256]`` in 0..7."""
    hmask = np.bitwise_or.reduce((codes.reshape(-1, 8, 32) >> 2) << np.arange(8, dtype=np.uint8)[:, None], axis=1)
    return np.concatenate([hmask, _pack_2bit(codes & 3)], axis=1)


def _signed_absmax_scale(scales: np.ndarray) -> np.ndarray:
    """The sub-scale of largest magnitude, sign kept (C keeps the first on ties)."""
    return np.take_along_axis(scales, np.abs(scales).argmax(axis=1)[:, None], axis=1)[:, 0]


def _pack_scales_q3(Ls: np.ndarray) -> np.ndarray:
    """16 six-bit codes ``[B, 16]`` -> Q3_K's 12 ``scales`` bytes: low nibbles of 0-7 and 8-15 share
    bytes 0-7 (low, high); the top 2 bits of code ``j`` go to byte ``8 + j % 4`` at bit ``2 (j // 4)``."""
    out = np.empty((Ls.shape[0], 12), dtype=np.uint8)
    out[:, :8] = (Ls[:, :8] & 0x0F) | ((Ls[:, 8:] & 0x0F) << 4)
    high = (Ls >> 4).reshape(-1, 4, 4)  # [B, j // 4, j % 4]
    out[:, 8:] = high[:, 0] | (high[:, 1] << 2) | (high[:, 2] << 4) | (high[:, 3] << 6)
    return out


def _fit_qk_asym(x: np.ndarray, qw: np.ndarray | None, nmax: int, ref_search: tuple[float, float, int]) -> BlockFit:
    """Shared by Q4_K and Q5_K: 8 sub-blocks of 32, ``x ~ d ls l - dmin lm``, 6-bit ``ls``/``lm``.

    Parameters: the ``d``+``dmin``+``scales`` header, 16 bytes; codes in 0..nmax.
    Without ``qw``: weights ``sqrt(mean(x^2) over the sub-block) + |x|`` and ``make_qkx2_quants`` with
    ``ref_search = (rmin, rdelta, nstep)``; the 6-bit codes map the largest scale/min onto 63. With
    ``qw``: weights ``qw sqrt(2 mean(x^2) + x^2)``, ``make_qkx3_quants`` and ``make_qp_quants``.
    """
    xs = x.reshape(-1, 32)
    if qw is None:
        w = np.sqrt(seq_sum(xs * xs)[:, None] / F32(32)) + np.abs(xs)
        scales, mins, L = make_qkx_quants(xs, w, nmax, *ref_search, use_mad=False)
        ls, d = _max_to_scale(scales.reshape(-1, 8), 63)
        lm, dmin = _max_to_scale(mins.reshape(-1, 8), 63)
    else:
        w = _sigma_weights(x, qw, 2.0).reshape(-1, 32)
        scales, mins, L = make_qkx_quants(xs, w, nmax, -0.9, 0.05, 36, use_mad=False)
        sw = seq_sum(w).reshape(-1, 8)
        d, ls = make_qp_quants(scales.reshape(-1, 8), 63, sw)
        dmin, lm = make_qp_quants(mins.reshape(-1, 8), 63, sw)
    d_bytes, d = _f16(d)
    dmin_bytes, dmin = _f16(dmin)
    step, the_min = d[:, None] * ls, dmin[:, None] * lm
    codes = _requantize(x.reshape(-1, 8, 32), L, step, the_min, 0, nmax)
    params = np.concatenate([d_bytes, dmin_bytes, _pack_scales_k4(ls, lm)], axis=1)
    return BlockFit(params, step, -the_min, codes.reshape(-1, QK_K), 0, nmax)


def fit_q4_k(x: np.ndarray, qw: np.ndarray | None) -> BlockFit:
    """Q4_K, 144 bytes: ``d``, ``dmin``, ``scales[12]``, ``qs[128]``; ``l`` in 0..15."""
    return _fit_qk_asym(x, qw, 15, (-1.0, 0.1, 20))


def pack_q4_k_codes(codes: np.ndarray) -> np.ndarray:
    """Q4_K's ``qs[128]`` (after the header) from codes uint8 ``[B, 256]`` in 0..15."""
    return _pack_nibbles(codes)


def fit_q5_k(x: np.ndarray, qw: np.ndarray | None) -> BlockFit:
    """Q5_K, 176 bytes: ``d``, ``dmin``, ``scales[12]``, ``qh[32]``, ``qs[128]``; ``l`` in 0..31."""
    return _fit_qk_asym(x, qw, 31, (-0.5, 0.1, 15))


def pack_q5_k_codes(codes: np.ndarray) -> np.ndarray:
    """Q5_K's ``qh[32]`` and ``qs[128]`` (after the header) from codes uint8 ``[B, 256]`` in 0..31.

    Bit 4 of value ``64 c + j`` (``j < 32``) goes to ``qh[j]`` bit ``2 c``, of ``64 c + 32 + j`` to bit ``2 c + 1``.
    """
    high = (codes >> 4).reshape(-1, 8, 32)  # [B, 2 c + half, j]
    qh = np.bitwise_or.reduce(high << np.arange(8, dtype=np.uint8)[:, None], axis=1)
    return np.concatenate([qh, _pack_nibbles(codes)], axis=1)


def fit_q6_k(x: np.ndarray, qw: np.ndarray | None) -> BlockFit:
    """Q6_K, 210 bytes: ``ql[128]``, ``qh[64]``, ``scales[16]`` (int8), ``d``; ``x ~ d sc (l)``, ``l`` in -32..31.

    16 sub-blocks of 16, ``make_qx_quants`` weighted by ``x^2`` (no ``qw``) or by ``qw`` itself: C's
    Q6_K impl uses the raw importance, without the ``sqrt(sigma2 + x^2)`` factor the others apply.
    The sub-scale of largest magnitude maps to -128. An all-zero super-block is all zero bytes.
    """
    xs = x.reshape(-1, 16)
    scales, L = make_qx_quants(xs, 32, xs * xs if qw is None else qw.reshape(-1, 16))
    scales = scales.reshape(-1, 16)
    smax = _signed_absmax_scale(scales)
    zero = np.abs(smax) < GROUP_MAX_EPS
    iscale = F32(-128) / np.where(zero, F32(1), smax)
    sc = np.where(zero[:, None], F32(0), np.clip(np.rint(iscale[:, None] * scales), -128, 127))
    d_bytes, d = _f16(np.where(zero, F32(0), F32(1) / iscale))
    step = d[:, None] * sc
    codes = _requantize(x.reshape(-1, 16, 16), L, step, None, -32, 31).reshape(-1, QK_K)
    codes = np.where(zero[:, None], np.uint8(0), codes)
    return BlockFit(np.concatenate([sc.astype(np.int8).view(np.uint8), d_bytes], axis=1), step,
                    np.zeros_like(step), codes, -32, 31)


def pack_q6_k_codes(codes: np.ndarray) -> np.ndarray:
    """Q6_K's ``ql[128]`` and ``qh[64]`` (before ``scales``) from codes uint8 ``[B, 256]`` in 0..63."""
    q = codes.reshape(-1, 2, 4, 32)
    lo, hi = q & 0x0F, q >> 4  # [B, half, quarter, l]
    ql = np.concatenate([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], axis=2)
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)
    return np.concatenate([ql.reshape(-1, 128), qh.reshape(-1, 64)], axis=1)

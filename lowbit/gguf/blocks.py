"""Float weights -> llama.cpp's GGUF block formats, byte for byte as ggml-common.h lays them out.

``quantize_rows(weight, qtype, importance)`` turns a float32 matrix ``[rows, cols]`` into uint8
``[rows, cols // block_size * type_size]``: each row is ``cols / block_size`` consecutive blocks,
exactly what a GGUF tensor of that type stores. ``gguf.quants.dequantize`` (gguf-py, llama.cpp's
own Python package) reads the bytes back, and is the oracle the tests hold these bytes to.

Without ``importance`` every type follows llama.cpp's reference quantizer (what ``llama-quantize``
runs without an imatrix); for Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and BF16 the bytes are identical to
``gguf.quants.quantize``. With ``importance`` (llama.cpp's imatrix: the mean of ``x^2`` of each input
column over calibration tokens) the types follow llama.cpp's ``quantize_*_impl`` searches, which
minimise the error weighted by ``importance[j] * sqrt(sigma2 + w_j^2)``, ``sigma2`` the mean of
``w^2`` over the row (Q4_0..Q5_1), or over the 256-value super-block (Q2_K; twice that for Q3_K,
Q4_K, Q5_K); Q6_K weights by ``importance[j]`` alone; Q8_0 and the float types ignore it. All as
llama.cpp does. K-quants live in ``kquants``, the searches in ``scale_search``; the table-grid
types IQ4_NL, IQ4_XS and MXFP4 in ``nonuniform`` (their search weighs ``x^2`` without an imatrix,
``importance * sqrt(sigma2 + x^2)`` with one; MXFP4 ignores it, as llama.cpp), the ternary TQ1_0
and TQ2_0 in ``ternary`` (llama.cpp ignores the importance there; lowbit fits the scale that
minimises the importance-weighted error), the lattice-codebook IQ3_XXS and IQ2_XS in ``lattice``
(whose ``BlockFit`` is the whole block: no per-value code is left to choose).
``fit_rows`` returns what the search chose (parameter bytes, their grid, the codes) before
``pack_blocks`` lays it out, so that GPTQ (``gptq_blocks``) can pick its own codes on that grid.
Deviation from llama.cpp, legacy types with importance only: C keeps the codes of the best search
grid and rounds the fitted scale to float16 afterwards; here every code is re-rounded to the
nearest level of the stored float16 scale (and minimum), which can only lower each value's error.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from lowbit.gguf import kquants, lattice, nonuniform, ternary
from lowbit.gguf.scale_search import (
    F32,
    BlockFit,
    make_qkx_quants,
    make_qx_quants,
    round_half_away,
    seq_sum,
)

T = GGMLQuantizationType
F16_MAX = 65504.0
CHUNK_VALUES = 1 << 18  # rows are quantized this many values at a time: keeps temporaries in cache

FloatQuantizer = Callable[[np.ndarray], np.ndarray]
"""``rows float32 [R, cols] -> uint8 [R, cols * ts]`` for the float types (no blocks, no importance)."""


@dataclass(frozen=True)
class BlockCodec:
    """One block type: its parameter search and its byte layout, kept apart so that a caller can
    fit the parameters, choose codes on their grid itself (GPTQ), and pack.

    A block's bytes are ``params[:head]``, the code bytes, ``params[head:]``.
    """

    fit: Callable[[np.ndarray, np.ndarray | None], BlockFit]
    """``(blocks float32 [B, bs], weights float32 [B, bs] or None) -> BlockFit``; the weights are
    the importance itself, or with ``row_weighted`` the error weights formed from it."""
    pack_codes: Callable[[np.ndarray], np.ndarray]
    """codes uint8 ``[B, bs]`` -> the block's code bytes ``[B, type_size - P]``."""
    head: int  # parameter bytes that come before the code bytes
    row_weighted: bool  # legacy types: the search weighs importance * sqrt(sigma2 + x^2), sigma2 over the row


def _f16_bytes(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(float16 bytes uint8 ``[..., 2]``, the stored value as float32 ``[...]``) of ``v [...]``."""
    h = v.astype(np.float16)
    return h[..., None].view(np.uint8), h.astype(F32)


def _legacy_weights(rows: np.ndarray, importance: np.ndarray, sigma2: np.ndarray | None) -> np.ndarray:
    """Error weights of the legacy ``_impl`` quantizers, ``[R, cols]``: ``importance * sqrt(sigma2 + x^2)``
    with ``sigma2 [R]`` the row's mean square (no factor 2 here, unlike Q3_K..Q5_K)."""
    if sigma2 is None:
        sigma2 = seq_sum(rows * rows) / F32(rows.shape[1])
    return importance[None, :] * np.sqrt(sigma2[:, None] + rows * rows)


def _symmetric(nmax: int) -> Callable[[np.ndarray, np.ndarray | None], BlockFit]:
    """Q4_0/Q5_0 blocks of 32, ``x = d l``, ``l`` in ``-nmax..nmax-1`` (codes ``l + nmax``), float16 ``d``.

    Reference (``quantize_row_q4_0_ref``): the value of largest magnitude maps to ``-nmax``, codes
    ``trunc(x / d + nmax + 0.5)``. With weights, ``make_qx_quants`` (``quantize_row_q4_0_impl``).
    """

    def fit(x: np.ndarray, w: np.ndarray | None) -> BlockFit:
        if w is None:
            idx = np.abs(x).argmax(axis=-1)[..., None]
            d = np.take_along_axis(x, idx, axis=-1) / F32(-nmax)
            with np.errstate(divide="ignore"):
                inv = np.where(d == 0, F32(0), F32(1) / d)
            codes = np.clip(np.trunc(x * inv + F32(nmax + 0.5)), 0, 2 * nmax - 1).astype(np.uint8)
            d_bytes, d = _f16_bytes(d[:, 0])
        else:
            d, L = make_qx_quants(x, nmax, w)
            d_bytes, d = _f16_bytes(d)
            d2 = d[:, None]
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                nearest = np.clip(np.rint(x / np.where(d2 == 0, F32(1), d2)), -nmax, nmax - 1) + nmax
            codes = np.where(d2 == 0, L, nearest).astype(np.uint8)
        return BlockFit(d_bytes, d[:, None], np.zeros((len(d), 1), F32), codes, -nmax, nmax - 1)

    return fit


def _asymmetric(nmax: int) -> Callable[[np.ndarray, np.ndarray | None], BlockFit]:
    """Q4_1/Q5_1 blocks of 32, ``x = d l + m``, ``l`` in ``0..nmax``, float16 ``d`` and ``m``.

    Reference: ``d = (max - min) / nmax``, ``m = min``, codes ``trunc((x - min) / d + 0.5)``. With
    weights, ``make_qkx3_quants`` (``quantize_row_q4_1_impl``).
    """

    def fit(x: np.ndarray, w: np.ndarray | None) -> BlockFit:
        if w is None:
            lo, hi = x.min(axis=-1, keepdims=True), x.max(axis=-1, keepdims=True)
            d = (hi - lo) / F32(nmax)
            with np.errstate(divide="ignore"):
                inv = np.where(d == 0, F32(0), F32(1) / d)
            codes = np.clip(np.trunc((x - lo) * inv + F32(0.5)), 0, nmax).astype(np.uint8)
            (d_bytes, d), (m_bytes, m) = _f16_bytes(d[:, 0]), _f16_bytes(lo[:, 0])
        else:
            d, the_min, L = make_qkx_quants(x, w, nmax, -0.9, 0.05, 36, use_mad=False)
            (d_bytes, d), (m_bytes, m) = _f16_bytes(d), _f16_bytes(-the_min)
            d2, m2 = d[:, None], m[:, None]
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                nearest = np.clip(np.rint((x - m2) / np.where(d2 == 0, F32(1), d2)), 0, nmax)
            codes = np.where(d2 == 0, L, nearest).astype(np.uint8)
        return BlockFit(np.concatenate([d_bytes, m_bytes], axis=-1), d[:, None], m[:, None], codes, 0, nmax)

    return fit


def _fit_q8_0(x: np.ndarray, w: np.ndarray | None) -> BlockFit:
    """Q8_0 blocks of 32, ``x = d l``, ``l`` int8 (codes ``l + 128``); ``d = absmax / 127``, C's ``roundf``.
    llama.cpp's ``quantize_q8_0`` ignores the importance, and so does this."""
    d = np.abs(x).max(axis=-1, keepdims=True) / F32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, F32(0), F32(1) / d)
    codes = round_half_away(x * inv).astype(np.int8).view(np.uint8) ^ np.uint8(0x80)
    d_bytes, d = _f16_bytes(d[:, 0])
    return BlockFit(d_bytes, d[:, None], np.zeros((len(d), 1), F32), codes, -128, 127)


def _nibbles(codes: np.ndarray) -> np.ndarray:
    """``qs[16]`` of the 32-value blocks: value ``j`` in the low nibble of byte ``j``, ``j + 16`` in the high."""
    return (codes[..., :16] & 0x0F) | (codes[..., 16:] << 4)


def _fifth_bits(codes: np.ndarray) -> np.ndarray:
    """``qh[4]`` of Q5_0/Q5_1: bit 4 of value ``j`` as bit ``j`` of a little-endian uint32."""
    return np.packbits(codes >> 4, axis=-1, bitorder="little")


def _q5_codes(codes: np.ndarray) -> np.ndarray:
    """``qh[4]`` then ``qs[16]`` of Q5_0/Q5_1."""
    return np.concatenate([_fifth_bits(codes), _nibbles(codes)], axis=-1)


def _bf16(rows: np.ndarray) -> np.ndarray:
    """bfloat16 by round-to-nearest-even of the top 16 bits (ggml_compute_fp32_to_bf16)."""
    n = rows.view(np.uint32).astype(np.uint64)
    return ((n + 0x7FFF + ((n >> 16) & 1)) >> 16).astype(np.uint16).view(np.uint8)


FLOAT_QUANTIZERS: dict[GGMLQuantizationType, FloatQuantizer] = {
    T.F32: lambda rows: rows.astype("<f4").view(np.uint8),
    T.F16: lambda rows: rows.astype("<f2").view(np.uint8),
    T.BF16: _bf16,
}
CODECS: dict[GGMLQuantizationType, BlockCodec] = {
    # block layouts of ggml-common.h: parameters before the codes (head), codes, parameters after
    T.Q8_0: BlockCodec(_fit_q8_0, lambda codes: codes ^ np.uint8(0x80), 2, False),  # d, qs[32] int8
    T.Q4_0: BlockCodec(_symmetric(8), _nibbles, 2, True),  # d, qs[16]; x = d (q - 8)
    T.Q4_1: BlockCodec(_asymmetric(15), _nibbles, 4, True),  # d, m, qs[16]; x = d q + m
    T.Q5_0: BlockCodec(_symmetric(16), _q5_codes, 2, True),  # d, qh[4], qs[16]; x = d (q - 16)
    T.Q5_1: BlockCodec(_asymmetric(31), _q5_codes, 4, True),  # d, m, qh[4], qs[16]; x = d q + m
    T.Q2_K: BlockCodec(kquants.fit_q2_k, kquants.pack_q2_k_codes, 16, False),  # scales[16], qs, d, dmin
    T.Q3_K: BlockCodec(kquants.fit_q3_k, kquants.pack_q3_k_codes, 0, False),  # hmask, qs, scales[12], d
    T.Q4_K: BlockCodec(kquants.fit_q4_k, kquants.pack_q4_k_codes, 16, False),  # d, dmin, scales[12], qs
    T.Q5_K: BlockCodec(kquants.fit_q5_k, kquants.pack_q5_k_codes, 16, False),  # d, dmin, scales[12], qh, qs
    T.Q6_K: BlockCodec(kquants.fit_q6_k, kquants.pack_q6_k_codes, 0, False),  # ql, qh, scales[16], d
    # table grids (nonuniform): x = d table[code]
    T.IQ4_NL: BlockCodec(nonuniform.fit_iq4_nl, nonuniform.pack_nibble_codes, 2, False),  # d, qs[16]
    T.IQ4_XS: BlockCodec(nonuniform.fit_iq4_xs, nonuniform.pack_nibble_codes, 8, False),  # d, scales_h, scales_l[4], qs
    T.MXFP4: BlockCodec(nonuniform.fit_mxfp4, nonuniform.pack_nibble_codes, 1, False),  # e, qs[16]
    # ternary: x = d t, t in {-1, 0, 1}
    T.TQ1_0: BlockCodec(ternary.fit_ternary, ternary.pack_tq1_0_codes, 0, False),  # qs[48], qh[4], d
    T.TQ2_0: BlockCodec(ternary.fit_ternary, ternary.pack_tq2_0_codes, 0, False),  # qs[64], d
    # lattice codebooks: the whole block is the fit's parameters
    T.IQ3_XXS: BlockCodec(lattice.fit_iq3_xxs, lattice.pack_no_codes, 98, False),  # d, qs[64], signs+scales[32]
    T.IQ2_XS: BlockCodec(lattice.fit_iq2_xs, lattice.pack_no_codes, 74, False),  # d, qs[32] u16, scales[8]
}
SUPPORTED_TYPES: tuple[GGMLQuantizationType, ...] = (*FLOAT_QUANTIZERS, *CODECS)
FLOAT_TYPES = (T.F32, T.BF16, T.MXFP4)  # the types whose range is not float16's (MXFP4: an 8-bit exponent)


def block_size(qtype: GGMLQuantizationType) -> int:
    """Values per block of ``qtype`` (1 for the float types, 32 for Q*_0/Q*_1/IQ4_NL/MXFP4, 256 for
    k-quants, IQ4_XS and TQ*_0).

    Raises:
        ValueError: ``qtype`` is not in ``SUPPORTED_TYPES``.
    """
    _check_type(qtype)
    return GGML_QUANT_SIZES[qtype][0]


def fits(qtype: GGMLQuantizationType, cols: int) -> bool:
    """Whether rows of ``cols`` values split into whole blocks of ``qtype``."""
    return cols > 0 and cols % block_size(qtype) == 0


def quantize_rows(weight: np.ndarray, qtype: GGMLQuantizationType, importance: np.ndarray | None = None) -> np.ndarray:
    """Quantize ``weight`` float ``[rows, cols]`` to ``qtype``: uint8 ``[rows, cols // block_size * type_size]``.

    ``importance``: optional float ``[cols]``, non-negative, the imatrix of this weight's input
    columns. Deterministic: the same input gives the same bytes. Work is vectorised over blocks in
    chunks of about ``CHUNK_VALUES`` values.

    Raises:
        ValueError: unsupported ``qtype``; ``weight`` not 2-D; ``cols`` not a multiple of the block
            size (check ``fits`` first); NaN/Inf in ``weight`` or ``importance``; negative or
            mis-shaped ``importance``; values beyond float16's range for a type with float16 fields.
    """
    rows = _checked_weight(weight, qtype)
    qw = None if importance is None else _checked_importance(importance, rows.shape[1], qtype)
    if qtype in FLOAT_QUANTIZERS:
        return FLOAT_QUANTIZERS[qtype](rows)
    step = max(1, CHUNK_VALUES // rows.shape[1])
    parts = []
    for i in range(0, rows.shape[0], step):
        chunk = rows[i:i + step]
        fit = _fit(chunk, qtype, qw, None)
        parts.append(pack_blocks(qtype, fit.params, fit.codes).reshape(chunk.shape[0], -1))
    return np.concatenate(parts, axis=0) if parts else np.zeros((0, _row_bytes(qtype, rows.shape[1])), np.uint8)


def fit_rows(weight: np.ndarray, qtype: GGMLQuantizationType, importance: np.ndarray | None = None, *,
             row_sigma2: np.ndarray | None = None) -> BlockFit:
    """What ``quantize_rows`` stores, before packing: the ``BlockFit`` of the ``rows * cols / block_size``
    blocks of ``weight`` float ``[rows, cols]``, in row order; ``pack_blocks`` turns it into bytes.

    ``row_sigma2``: float ``[rows]``, the mean of ``w^2`` over each whole row, which the legacy
    types weigh the importance with; by default that of ``weight``'s own rows. Pass it when
    ``weight`` holds only some columns of the real rows (GPTQ fits one block at a time). K-quants
    take theirs from the super-block and ignore it.

    Raises:
        ValueError: as ``quantize_rows``; a float type (it has no blocks); a mis-shaped ``row_sigma2``.
    """
    rows = _checked_weight(weight, qtype)
    _check_block_type(qtype)
    qw = None if importance is None else _checked_importance(importance, rows.shape[1], qtype)
    if row_sigma2 is not None:
        row_sigma2 = np.asarray(row_sigma2, dtype=F32)
        if row_sigma2.shape != (rows.shape[0],):
            raise ValueError(f"row_sigma2 must be float [rows]=[{rows.shape[0]}] (one mean square per row), "
                             f"got shape {row_sigma2.shape}")
    return _fit(rows, qtype, qw, row_sigma2)


def pack_blocks(qtype: GGMLQuantizationType, params: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Lay out ``B`` blocks of ``qtype``: parameter bytes ``params`` uint8 ``[B, P]`` (a ``BlockFit``'s)
    and codes uint8 ``[B, block_size]`` in ``0..hi - lo`` -> uint8 ``[B, type_size]``.

    Codes outside that range are not checked: their extra bits would spill into neighbours.

    Raises:
        ValueError: a float or unsupported type, or arrays not uint8 of those shapes.
    """
    _check_block_type(qtype)
    bs, ts = GGML_QUANT_SIZES[qtype]
    codec = CODECS[qtype]
    if (params.dtype != np.uint8 or codes.dtype != np.uint8 or params.ndim != 2
            or codes.shape != (params.shape[0], bs)):
        raise ValueError(f"{qtype.name} blocks need uint8 params [B, P] and codes [B, {bs}], got "
                         f"{params.dtype} {params.shape} and {codes.dtype} {codes.shape}")
    out = np.concatenate([params[:, :codec.head], codec.pack_codes(codes), params[:, codec.head:]], axis=1)
    if out.shape[1] != ts:
        raise ValueError(f"{qtype.name} params must be the {qtype.name} parameter bytes of a BlockFit: the blocks "
                         f"came out {out.shape[1]} bytes, not {ts}")
    return out


def _fit(rows: np.ndarray, qtype: GGMLQuantizationType, qw: np.ndarray | None,
         row_sigma2: np.ndarray | None) -> BlockFit:
    """``fit_rows`` on checked float32 ``rows [R, cols]`` and importance ``qw [cols]``."""
    codec, bs = CODECS[qtype], GGML_QUANT_SIZES[qtype][0]
    if qw is not None:
        qw = _legacy_weights(rows, qw, row_sigma2) if codec.row_weighted else np.broadcast_to(qw, rows.shape)
        qw = qw.reshape(-1, bs)
    return codec.fit(rows.reshape(-1, bs), qw)


def dequantize_rows(data: np.ndarray, qtype: GGMLQuantizationType, cols: int) -> np.ndarray:
    """Inverse of ``quantize_rows``: uint8 ``[rows, cols // block_size * type_size]`` -> float32 ``[rows, cols]``.

    Decoding is gguf-py's ``gguf.quants.dequantize``, llama.cpp's own reader.

    Raises:
        ValueError: unsupported ``qtype``, ``cols`` not a multiple of the block size, or ``data``
            not uint8 of that row width.
    """
    _check_cols(qtype, cols)
    want = _row_bytes(qtype, cols)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != want:
        raise ValueError(f"{qtype.name} data for cols={cols} must be uint8 [rows, {want}], "
                         f"got {data.dtype} {tuple(data.shape)}")
    return dequantize(data, qtype).reshape(data.shape[0], cols)


def _row_bytes(qtype: GGMLQuantizationType, cols: int) -> int:
    bs, ts = GGML_QUANT_SIZES[qtype]
    return cols // bs * ts


def _check_type(qtype: GGMLQuantizationType) -> None:
    if qtype not in SUPPORTED_TYPES:
        names = ", ".join(t.name for t in SUPPORTED_TYPES)
        raise ValueError(f"GGUF type {getattr(qtype, 'name', qtype)!r} is not supported; supported: {names}")


def _check_block_type(qtype: GGMLQuantizationType) -> None:
    _check_type(qtype)
    if qtype not in CODECS:
        names = ", ".join(t.name for t in CODECS)
        raise ValueError(f"{qtype.name} stores plain floats, it has no blocks to fit; block types: {names}")


def _check_cols(qtype: GGMLQuantizationType, cols: int) -> None:
    if not fits(qtype, cols):
        bs = block_size(qtype)
        raise ValueError(f"{qtype.name} packs blocks of {bs} values, but cols={cols} is not a positive "
                         f"multiple of {bs}; pick a type that fits (see fits()) or keep this tensor in F16")


def _checked_weight(weight: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    _check_type(qtype)
    weight = np.asarray(weight)
    if weight.ndim != 2 or not np.issubdtype(weight.dtype, np.floating):
        raise ValueError(f"quantize_rows needs a 2-D float weight [rows, cols], got {weight.dtype} {weight.shape}")
    _check_cols(qtype, weight.shape[1])
    rows = np.ascontiguousarray(weight, dtype=F32)
    if not np.isfinite(rows).all():
        bad = int((~np.isfinite(rows)).sum())
        raise ValueError(f"weight has {bad} NaN/Inf values; {qtype.name} cannot store them (check the source model)")
    if qtype not in FLOAT_TYPES and rows.size and np.abs(rows).max() > F16_MAX:
        raise ValueError(f"weight has |values| up to {np.abs(rows).max():.4g}, beyond the float16 range "
                         f"({F16_MAX}) of {qtype.name}'s scales; use F32 or BF16 for this tensor")
    return rows


def _checked_importance(importance: np.ndarray, cols: int, qtype: GGMLQuantizationType) -> np.ndarray:
    qw = np.asarray(importance, dtype=F32)
    if qw.shape != (cols,):
        raise ValueError(f"importance must be float [cols]=[{cols}] (one value per input column), "
                         f"got shape {qw.shape}")
    if not np.isfinite(qw).all() or (qw < 0).any():
        raise ValueError(f"importance for {qtype.name} must be finite and >= 0 "
                         "(the imatrix: mean of x^2 per input column)")
    return qw

"""GGUF block types that are lowbit schemes: read a tensor's blocks as a ``QuantizedWeight``, write one back.

Each entry of ``BLOCK_SCHEMES`` says which lowbit scheme stores a GGUF block type exactly, and how the
block's fields become the scheme's tensors: codes (as lowbit numbers them: offset binary for signed
grids, so Q4_0's nibble ``q`` of ``d (q - 8)`` is lowbit's int4 code as it is), float16 scales and float
minimums, and for the 256-value super-blocks the two-level scales (``super_scale`` = llama.cpp's ``d``,
``sub_scale`` its 4-, 6- or 8-bit sub-block scales, ``super_min``/``sub_min`` its ``dmin`` and minimums).
``QuantizedWeight.dequantize`` of a weight read here equals gguf-py's ``gguf.quants.dequantize`` of
the bytes bit for bit (the same float32 products, in the same order), and ``to_blocks`` writes the
bytes it was read from. Types without an entry (the lattice IQ types, ternary, MXFP4, the float types)
are not codes lowbit can hold: a reader dequantizes them and says so.

    Q8_0  int8 g32 sym                      w = d q                  (q = code - 128)
    Q4_0  int4 g32 sym                      w = d (code - 8)
    Q5_0  int5 g32 sym                      w = d (code - 16)
    Q4_1  int4 g32 float minimum            w = d code + m
    Q5_1  int5 g32 float minimum            w = d code + m
    Q2_K  int2 g16 min, 16 x 4-bit scales   w = d sc code - dmin m
    Q3_K  int3 g16 sym, 16 x 6-bit signed   w = d (sc - 32) (code - 4)
    Q4_K  int4 g32 min, 8 x 6-bit scales    w = d sc code - dmin m
    Q5_K  int5 g32 min, 8 x 6-bit scales    w = d sc code - dmin m
    Q6_K  int6 g16 sym, 16 x 8-bit signed   w = d sc (code - 32)
    IQ4_NL  iq4_nl g32                      w = d kvalues[code]
    IQ4_XS  iq4_nl g32, 8 x 6-bit signed    w = d (sc - 32) kvalues[code]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from lowbit.formats import FormatName, pack, unpack
from lowbit.formats.iq4nl import IQ4_NL
from lowbit.gguf.kquants import _pack_scales_k4, _pack_scales_q3
from lowbit.qweight import QuantizedWeight
from lowbit.scheme import Granularity, QuantScheme, ZeroPoint

T = GGMLQuantizationType


@dataclass
class BlockFields:
    """``B`` blocks of one type in lowbit's terms.

    Fields:
        codes: uint8 ``[B, block_size]``, lowbit code values (``0 .. 2**bits - 1``).
        d: float16 ``[B]``: the block's scale (one-level types) or super-block scale (K types, IQ4_XS).
        m: float16 ``[B]`` or None: the float minimum (Q4_1/Q5_1) or ``dmin`` (Q2_K/Q4_K/Q5_K).
        sub: uint8 ``[B, S]`` or None: sub-block scale codes (offset binary where signed).
        sub_min: uint8 ``[B, S]`` or None: sub-block minimum codes.
    """

    codes: np.ndarray
    d: np.ndarray
    m: np.ndarray | None = None
    sub: np.ndarray | None = None
    sub_min: np.ndarray | None = None


@dataclass(frozen=True)
class BlockScheme:
    """A GGUF block type stored exactly by ``scheme``: ``read`` uint8 blocks ``[B, type_size]`` ->
    ``BlockFields``; ``write`` the inverse."""

    qtype: GGMLQuantizationType
    scheme: QuantScheme
    read: Callable[[np.ndarray], BlockFields]
    write: Callable[[BlockFields], np.ndarray]


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    return np.ascontiguousarray(blocks[:, at:at + 2]).view(np.float16)[:, 0]


def _f16_bytes(v: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(v, dtype=np.float16).reshape(-1, 1).view(np.uint8)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """``qs`` of 16 bytes per 32 values (value ``j`` low nibble, ``j + 16`` high) -> codes ``[B, 32 n]``."""
    q = qs.reshape(qs.shape[0], -1, 1, 16) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    return (q & 0x0F).reshape(qs.shape[0], -1)


def _to_nibbles(codes: np.ndarray) -> np.ndarray:
    q = codes.reshape(codes.shape[0], -1, 2, 16)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(codes.shape[0], -1)


def _fifth_bits(qh: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1 ``qh[4]``: bit ``j`` of a little-endian uint32 is bit 4 of value ``j``."""
    return np.unpackbits(qh, axis=1, bitorder="little")


def _legacy(head: int, bits: int, minimum: bool) -> tuple[Callable, Callable]:
    """Q4_0/Q4_1/Q5_0/Q5_1: ``d`` (and ``m``), then for 5 bits ``qh[4]``, then ``qs[16]``."""

    def read(b: np.ndarray) -> BlockFields:
        codes = _nibbles(b[:, head + (4 if bits == 5 else 0):])
        if bits == 5:
            codes = codes | (_fifth_bits(b[:, head:head + 4]) << 4)
        return BlockFields(codes, _f16(b, 0), _f16(b, 2) if minimum else None)

    def write(f: BlockFields) -> np.ndarray:
        parts = [_f16_bytes(f.d)] + ([_f16_bytes(f.m)] if minimum else [])
        if bits == 5:
            parts.append(np.packbits(f.codes >> 4, axis=1, bitorder="little"))
        return np.concatenate([*parts, _to_nibbles(f.codes & 0x0F)], axis=1)

    return read, write


def _read_q8_0(b: np.ndarray) -> BlockFields:
    return BlockFields(b[:, 2:] ^ np.uint8(0x80), _f16(b, 0))  # int8 q -> offset binary q + 128


def _write_q8_0(f: BlockFields) -> np.ndarray:
    return np.concatenate([_f16_bytes(f.d), f.codes ^ np.uint8(0x80)], axis=1)


def _two_bit(qs: np.ndarray) -> np.ndarray:
    """Q2_K/Q3_K ``qs[64]``: in each half of 128 values, byte ``l`` holds values ``l, l+32, l+64, l+96``."""
    q = qs.reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    return (q & 3).reshape(-1, 256)


def _to_two_bit(codes: np.ndarray) -> np.ndarray:
    q = codes.reshape(-1, 2, 4, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(-1, 64)


def _read_q2_k(b: np.ndarray) -> BlockFields:  # scales[16] (scale | min << 4), qs[64], d, dmin
    return BlockFields(_two_bit(b[:, 16:80]), _f16(b, 80), _f16(b, 82), b[:, :16] & 0x0F, b[:, :16] >> 4)


def _write_q2_k(f: BlockFields) -> np.ndarray:
    return np.concatenate([f.sub | (f.sub_min << 4), _to_two_bit(f.codes), _f16_bytes(f.d), _f16_bytes(f.m)], axis=1)


def _read_q3_k(b: np.ndarray) -> BlockFields:  # hmask[32], qs[64], scales[12], d
    high = (b[:, :32].reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1
    codes = _two_bit(b[:, 32:96]) | (high.reshape(-1, 256) << 2)  # q = ql - 4 (1 - h): code q + 4 = ql + 4 h
    s = b[:, 96:108]
    low = (s[:, :8].reshape(-1, 1, 8) >> np.array([0, 4], np.uint8).reshape(1, 2, 1)).reshape(-1, 16) & 0x0F
    top = (s[:, 8:].reshape(-1, 1, 4) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 4, 1)).reshape(-1, 16) & 3
    return BlockFields(codes, _f16(b, 108), sub=low | (top << 4))  # sc - 32: offset binary already


def _write_q3_k(f: BlockFields) -> np.ndarray:
    hmask = np.bitwise_or.reduce((f.codes.reshape(-1, 8, 32) >> 2) << np.arange(8, dtype=np.uint8)[:, None], axis=1)
    return np.concatenate([hmask, _to_two_bit(f.codes & 3), _pack_scales_q3(f.sub), _f16_bytes(f.d)], axis=1)


def _scale_min_k4(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K ``scales[12]`` -> eight 6-bit scales and minimums (ggml's ``get_scale_min_k4``)."""
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=1)
    return sc, mn


def _k_nibbles(qs: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K ``qs[128]``: each 64 values are 32 bytes, value ``l`` low nibble, ``l + 32`` high."""
    q = qs.reshape(-1, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    return (q & 0x0F).reshape(-1, 256)


def _to_k_nibbles(codes: np.ndarray) -> np.ndarray:
    q = (codes & 0x0F).reshape(-1, 4, 2, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)


def _read_qk(bits: int) -> Callable[[np.ndarray], BlockFields]:
    def read(b: np.ndarray) -> BlockFields:  # d, dmin, scales[12], (qh[32]), qs[128]
        sc, mn = _scale_min_k4(b[:, 4:16])
        codes = _k_nibbles(b[:, -128:])
        if bits == 5:  # bit 4 of value 32 k + j is bit k of qh[j]
            high = (b[:, 16:48].reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1
            codes = codes | (high.reshape(-1, 256) << 4)
        return BlockFields(codes, _f16(b, 0), _f16(b, 2), sc, mn)

    return read


def _write_qk(bits: int) -> Callable[[BlockFields], np.ndarray]:
    def write(f: BlockFields) -> np.ndarray:
        parts = [_f16_bytes(f.d), _f16_bytes(f.m), _pack_scales_k4(f.sub, f.sub_min)]
        if bits == 5:
            high = (f.codes >> 4).reshape(-1, 8, 32)
            parts.append(np.bitwise_or.reduce(high << np.arange(8, dtype=np.uint8)[:, None], axis=1))
        return np.concatenate([*parts, _to_k_nibbles(f.codes)], axis=1)

    return write


def _read_q6_k(b: np.ndarray) -> BlockFields:  # ql[128], qh[64], scales[16] int8, d
    ql = (b[:, :128].reshape(-1, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & 0x0F
    qh = (b[:, 128:192].reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3
    codes = ql.reshape(-1, 256) | (qh.reshape(-1, 256) << 4)  # q - 32: offset binary already
    return BlockFields(codes, _f16(b, 208), sub=b[:, 192:208] ^ np.uint8(0x80))  # int8 sc -> sc + 128


def _write_q6_k(f: BlockFields) -> np.ndarray:
    q = f.codes.reshape(-1, 2, 4, 32)
    lo, hi = q & 0x0F, q >> 4
    ql = np.concatenate([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], axis=2)
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)
    return np.concatenate([ql.reshape(-1, 128), qh.reshape(-1, 64), f.sub ^ np.uint8(0x80), _f16_bytes(f.d)], axis=1)


def _read_iq4_nl(b: np.ndarray) -> BlockFields:  # d, qs[16]
    return BlockFields(_nibbles(b[:, 2:]), _f16(b, 0))


def _write_iq4_nl(f: BlockFields) -> np.ndarray:
    return np.concatenate([_f16_bytes(f.d), _to_nibbles(f.codes)], axis=1)


def _read_iq4_xs(b: np.ndarray) -> BlockFields:  # d, scales_h (uint16), scales_l[4], qs[128]
    high = np.ascontiguousarray(b[:, 2:4]).view("<u2")  # [B, 1]
    high = (high >> (2 * np.arange(8, dtype=np.uint16))) & 3
    low = (b[:, 4:8].reshape(-1, 4, 1) >> np.array([0, 4], np.uint8).reshape(1, 1, 2)).reshape(-1, 8) & 0x0F
    return BlockFields(_nibbles(b[:, 8:]), _f16(b, 0), sub=low | (high.astype(np.uint8) << 4))  # ls - 32


def _write_iq4_xs(f: BlockFields) -> np.ndarray:
    scales_h = np.bitwise_or.reduce((f.sub.astype(np.uint16) >> 4) << (2 * np.arange(8, dtype=np.uint16)), axis=1)
    lo = f.sub & 0x0F
    return np.concatenate([_f16_bytes(f.d), scales_h.astype("<u2").reshape(-1, 1).view(np.uint8),
                           lo[:, 0::2] | (lo[:, 1::2] << 4), _to_nibbles(f.codes)], axis=1)


def _int(bits: int, group: int, *, minimum: bool = False, super_group: int | None = None,
         sub_bits: int | None = None, signed: bool = False, fmt: FormatName = FormatName.INT) -> QuantScheme:
    return QuantScheme(format=fmt, bits=bits, group_size=group, symmetric=not minimum,
                       zero_point=ZeroPoint.FLOAT if minimum else ZeroPoint.INT, super_group=super_group,
                       sub_scale_bits=sub_bits, sub_scale_signed=signed)


BLOCK_SCHEMES: dict[GGMLQuantizationType, BlockScheme] = {s.qtype: s for s in (
    BlockScheme(T.Q8_0, _int(8, 32), _read_q8_0, _write_q8_0),
    BlockScheme(T.Q4_0, _int(4, 32), *_legacy(2, 4, False)),
    BlockScheme(T.Q5_0, _int(5, 32), *_legacy(2, 5, False)),
    BlockScheme(T.Q4_1, _int(4, 32, minimum=True), *_legacy(4, 4, True)),
    BlockScheme(T.Q5_1, _int(5, 32, minimum=True), *_legacy(4, 5, True)),
    BlockScheme(T.Q2_K, _int(2, 16, minimum=True, super_group=16, sub_bits=4), _read_q2_k, _write_q2_k),
    BlockScheme(T.Q3_K, _int(3, 16, super_group=16, sub_bits=6, signed=True), _read_q3_k, _write_q3_k),
    BlockScheme(T.Q4_K, _int(4, 32, minimum=True, super_group=8, sub_bits=6), _read_qk(4), _write_qk(4)),
    BlockScheme(T.Q5_K, _int(5, 32, minimum=True, super_group=8, sub_bits=6), _read_qk(5), _write_qk(5)),
    BlockScheme(T.Q6_K, _int(6, 16, super_group=16, sub_bits=8, signed=True), _read_q6_k, _write_q6_k),
    BlockScheme(T.IQ4_NL, _int(4, 32, fmt=IQ4_NL), _read_iq4_nl, _write_iq4_nl),
    BlockScheme(T.IQ4_XS, _int(4, 32, super_group=8, sub_bits=6, signed=True, fmt=IQ4_NL), _read_iq4_xs,
                _write_iq4_xs),
)}


def _canonical(scheme: QuantScheme) -> QuantScheme:
    """``scheme`` as the table writes it: the observer only chose the codes, it is not part of them."""
    return replace(scheme, observer="minmax")


_BY_SCHEME = {_canonical(s.scheme): s for s in BLOCK_SCHEMES.values()}


def lossless_mismatch(scheme: QuantScheme) -> str | None:
    """Why weights of ``scheme`` have no exact GGUF block type, or None when they have one."""
    if _canonical(scheme) in _BY_SCHEME:
        return None
    if scheme.format not in {s.scheme.format for s in BLOCK_SCHEMES.values()}:
        return f"{scheme.format.value} has no GGUF block type with the same code table"
    if scheme.sparse or scheme.group_index:
        return "GGUF blocks hold no sparse outliers and no column group index"
    if scheme.super_group is not None:
        kinds = ", ".join(f"{s.qtype.name} {s.scheme.describe()}" for s in BLOCK_SCHEMES.values()
                          if s.scheme.super_group is not None)
        return f"two-level scales are GGUF's only as the K types and IQ4_XS lay them out ({kinds})"
    if scheme.float32_scales:
        return "GGUF blocks store float16 scales, not float32 ones"
    if scheme.granularity is not Granularity.GROUP or scheme.group_size != 32:
        return "GGUF's Q*_0/Q*_1 blocks hold 32 values under one scale; the scheme needs groups of 32"
    if scheme.double_quant:
        return "double-quantized scales are 8-bit codes, GGUF blocks store float16 scales"
    if not scheme.symmetric and scheme.zero_point is ZeroPoint.INT:
        return ("integer zero-points give w = s (q - z); Q4_1/Q5_1 store w = d q + m, and m = -s z "
                "in float16 does not reproduce it exactly (use ZeroPoint.FLOAT)")
    kind = "symmetric" if scheme.symmetric else "asymmetric"
    return f"no GGUF block type stores {kind} {scheme.format.value}{scheme.bits} codes"


def lossless_type(scheme: QuantScheme) -> GGMLQuantizationType | None:
    """The GGUF type that stores weights of ``scheme`` exactly, or None (``lossless_mismatch`` says why)."""
    found = _BY_SCHEME.get(_canonical(scheme))
    return None if found is None else found.qtype


def to_quantized_weight(data: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, int]) -> QuantizedWeight:
    """The GGUF tensor ``data`` (uint8 ``[rows, cols // block_size * type_size]``, gguf-py's layout) of
    type ``qtype`` as a ``QuantizedWeight`` of ``shape = (rows, cols)`` holding the same codes and scales.

    Raises:
        ValueError: ``qtype`` has no lowbit scheme (see ``BLOCK_SCHEMES``), or ``data`` is not uint8 of
            that shape.
    """
    entry = BLOCK_SCHEMES.get(qtype)
    if entry is None:
        raise ValueError(f"GGUF type {qtype.name} has no lowbit scheme; dequantize it "
                         f"(mapped types: {', '.join(t.name for t in BLOCK_SCHEMES)})")
    rows, cols = shape
    bs, ts = GGML_QUANT_SIZES[qtype]
    if data.dtype != np.uint8 or tuple(data.shape) != (rows, cols // bs * ts) or cols % bs:
        raise ValueError(f"{qtype.name} data for a {rows}x{cols} weight must be uint8 [{rows}, {cols // bs * ts}], "
                         f"got {data.dtype} {tuple(data.shape)}")
    scheme = entry.scheme
    f = entry.read(np.ascontiguousarray(data).reshape(-1, ts))
    nb = cols // bs
    tensors = {"qdata": pack(torch.from_numpy(np.ascontiguousarray(f.codes)).reshape(rows, cols), scheme.bits)}

    def half(v: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(v, dtype=np.float16)).reshape(rows, nb)

    def sub_codes(v: np.ndarray) -> torch.Tensor:
        return pack(torch.from_numpy(np.ascontiguousarray(v)).reshape(rows, -1), scheme.sub_scale_bits)

    if scheme.super_group is None:
        tensors["scale"] = half(f.d)
        if f.m is not None:
            tensors["zero"] = half(f.m)
    else:
        tensors.update(super_scale=half(f.d), sub_scale=sub_codes(f.sub))
        if f.m is not None:
            tensors.update(super_min=half(f.m), sub_min=sub_codes(f.sub_min))
    return QuantizedWeight.from_tensors(scheme, shape, tensors)


def from_quantized_weight(qw: QuantizedWeight) -> tuple[GGMLQuantizationType, np.ndarray]:
    """Repack lowbit's codes and scales as GGUF blocks, without requantizing.

    Returns ``(qtype, data)`` with ``data`` uint8 ``[out_features, in_features // block_size * type_size]``;
    ``gguf.quants.dequantize(data, qtype)`` equals ``qw.dequantize()`` bit for bit, and a weight read by
    ``to_quantized_weight`` gives back the bytes it was read from.

    Raises:
        ValueError: the scheme has no exact GGUF counterpart (the message says why; check
            ``lossless_type`` first and requantize with ``blocks.quantize_rows`` instead).
    """
    reason = lossless_mismatch(qw.scheme)
    if reason:
        raise ValueError(f"{qw.scheme.describe()} cannot be stored in GGUF without requantizing: {reason}")
    entry = _BY_SCHEME[_canonical(qw.scheme)]
    rows, cols = qw.shape
    bs, _ = GGML_QUANT_SIZES[entry.qtype]
    B = rows * cols // bs

    def per_block(t: torch.Tensor) -> np.ndarray:
        return t.detach().cpu().numpy().astype(np.float16).reshape(B)

    def sub_codes(t: torch.Tensor) -> np.ndarray:
        G = qw.layout.rows[1]
        return unpack(t.detach().cpu(), qw.scheme.sub_scale_bits, G).numpy().reshape(B, -1)

    codes = qw.codes().cpu().numpy().reshape(B, bs)
    if qw.scheme.super_group is None:
        fields = BlockFields(codes, per_block(qw.scale), None if qw.zero is None else per_block(qw.zero))
    else:
        minimum = qw.super_min is not None
        fields = BlockFields(codes, per_block(qw.super_scale), per_block(qw.super_min) if minimum else None,
                             sub_codes(qw.sub_scale), sub_codes(qw.sub_min) if minimum else None)
    return entry.qtype, entry.write(fields).reshape(rows, -1)

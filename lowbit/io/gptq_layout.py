"""GPTQ's and AWQ's packed tensors, from a ``QuantizedWeight`` and back, without a float detour.

GPTQ (AutoGPTQ's v1 checkpoint layout, which transformers, GPTQModel and vLLM read), per linear of
``in`` inputs, ``out`` outputs, ``G`` groups, ``b`` bits:

    qweight  int32 [in * b / 32, out]   codes packed along the input dimension, LSB first
    qzeros   int32 [G, out * b / 32]    zero-points minus one, packed along the output dimension
    scales   float16 [G, out]
    g_idx    int32 [in]                 the group of every input column (act-order permutes it)
    w[o, i] = scales[g_idx[i], o] * (code[i, o] - (qzeros[g_idx[i], o] + 1))

The packing of ``b`` in {2, 4, 8} puts ``32 / b`` codes in a word; 3 bits run 32 codes through 3 words
as one little-endian bit stream. Both are exactly ``lowbit.formats.pack``'s byte layout read as
little-endian int32, so the codes move without unpacking. The stored zero is ``z - 1`` (the "v1"
offset): lowbit's symmetric signed grid (``w = s (code - 2**(b-1))``) is zero ``2**(b-1)``, stored as
``2**(b-1) - 1``; an asymmetric zero of 0 has no v1 encoding and is refused.

AWQ's GEMM layout (AutoAWQ ``WQLinear_GEMM``), 4 bits only, no zero offset:

    qweight  int32 [in, out / 8]   codes packed along the output dimension, nibble i holding column
    qzeros   int32 [G, out / 8]    ``AWQ_ORDER[i]`` of each group of 8
    scales   float16 [G, out]
    w[o, i] = scales[i // group, o] * (code[i, o] - zero[i // group, o])
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from lowbit.formats import FormatName, pack, unpack
from lowbit.qweight import QuantizedWeight
from lowbit.scheme import Granularity, QuantScheme, ZeroPoint

GPTQ_BITS = (2, 3, 4, 8)
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ's pack order: nibble i of a word holds column AWQ_ORDER[i]
_AWQ_UNORDER = tuple(AWQ_ORDER.index(c) for c in range(8))


def gptq_mismatch(scheme: QuantScheme) -> str | None:
    """None when GPTQ's layout stores ``scheme`` exactly, else why not (one clause)."""
    if scheme.format is not FormatName.INT:
        return f"GPTQ stores integer codes, not {scheme.format.value}"
    if scheme.bits not in GPTQ_BITS:
        return f"GPTQ packs {', '.join(map(str, GPTQ_BITS))} bits, not {scheme.bits}"
    if scheme.granularity is Granularity.TENSOR:
        return "GPTQ has group or per-channel scales, not one per tensor"
    if scheme.double_quant or scheme.super_group is not None or scheme.float32_scales:
        return "GPTQ stores float16 scales, not 8-bit, two-level or float32 ones"
    if not scheme.symmetric and scheme.zero_point is ZeroPoint.FLOAT:
        return "GPTQ's zero-points are integers on the code grid, not float minimums"
    if scheme.sparse:
        return "GPTQ has no sparse outlier part"
    return None


def awq_mismatch(scheme: QuantScheme) -> str | None:
    """None when AWQ's GEMM layout stores ``scheme`` exactly, else why not (one clause)."""
    if scheme.format is not FormatName.INT or scheme.bits != 4:
        return f"AWQ's GEMM layout stores int4 codes, not {scheme.describe().split()[0]}"
    if scheme.granularity is not Granularity.GROUP or scheme.group_index:
        return "AWQ has group scales in natural order only (no per-channel, per-tensor or act-order g_idx)"
    return gptq_mismatch(scheme)


def _zeros(qw: QuantizedWeight) -> Tensor:
    """Integer zero-points ``[R, G]`` on the unsigned code grid (``2**(b-1)`` for a symmetric scheme)."""
    z = qw.zeros()
    if z is None:
        R, G = qw.layout.rows
        return torch.full((R, G), 2 ** (qw.scheme.bits - 1), dtype=torch.int64)
    return z.to(torch.int64)


def _words(codes: Tensor, bits: int) -> Tensor:
    """uint8 codes ``[rows, n]`` packed along ``n`` as int32 words ``[rows, n * bits / 32]``."""
    if codes.shape[-1] * bits % 32:
        raise ValueError(f"{codes.shape[-1]} codes of {bits} bits do not fill whole 32-bit words")
    return pack(codes.contiguous(), bits).view(torch.int32)


def _codes(words: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of ``_words``: int32 ``[rows, n * bits / 32]`` -> uint8 codes ``[rows, n]``."""
    return unpack(words.contiguous().view(torch.uint8), bits, n)


def gptq_tensors(qw: QuantizedWeight, layer: str = "layer", *, v2: bool = False) -> dict[str, Tensor]:
    """``qweight``/``qzeros``/``scales``/``g_idx`` of ``qw`` in GPTQ's v1 layout (``v2``: GPTQModel's
    ``gptq_v2``, which stores the zero-points themselves).

    Raises:
        ValueError: the scheme has no GPTQ form (``gptq_mismatch``), a dimension does not fill whole
            words, or (v1) an asymmetric zero-point is 0 (v1 stores ``z - 1``).
    """
    why = gptq_mismatch(qw.scheme)
    if why is not None:
        raise ValueError(f"{layer}: {qw.scheme.describe()} has no GPTQ form: {why}")
    bits, in_features = qw.scheme.bits, qw.shape[1]
    zeros = _zeros(qw)
    if not v2 and bool((zeros == 0).any()):
        raise ValueError(f"{layer}: a zero-point of 0, which GPTQ's v1 layout (zero - 1 stored) cannot hold; "
                         "export with --gptq-v2 (GPTQModel's layout), or --to compressed-tensors")
    G = qw.layout.rows[1]
    group = in_features // G
    g_idx = qw.g_idx if qw.g_idx is not None else torch.arange(in_features, dtype=torch.int32) // group
    return {
        "qweight": _words(qw.codes(), bits).t().contiguous(),
        "qzeros": _words((zeros - (0 if v2 else 1)).to(torch.uint8).t(), bits),
        "scales": qw.scales().half().t().contiguous(),
        "g_idx": g_idx.to(torch.int32).contiguous(),
    }


def gptq_weight(tensors: dict[str, Tensor], bits: int, group_size: int, sym: bool,
                shape: tuple[int, int], layer: str = "layer", *, v2: bool = False) -> QuantizedWeight:
    """The ``QuantizedWeight`` a GPTQ v1 (``v2``: gptq_v2) layer's tensors hold, codes as they are.

    ``group_size`` -1 is per channel. A symmetric file whose zeros are all ``2**(b-1)`` becomes a
    symmetric lowbit scheme; otherwise the zeros are kept (asymmetric, integer zero-points). A
    ``g_idx`` other than natural order becomes ``group_index``.

    Raises:
        ValueError: a tensor is missing or of the wrong shape or dtype, or bits/group size are not GPTQ's.
    """
    out_features, in_features = shape
    if bits not in GPTQ_BITS:
        raise ValueError(f"{layer}: GPTQ bits must be one of {GPTQ_BITS}, got {bits}")
    group = in_features if group_size in (-1, None) else group_size
    if group <= 0 or in_features % group:
        raise ValueError(f"{layer}: group size {group_size} does not divide in_features={in_features}")
    G = in_features // group
    expected = {"qweight": ((in_features * bits // 32, out_features), torch.int32),
                "qzeros": ((G, out_features * bits // 32), torch.int32),
                "scales": ((G, out_features), None), "g_idx": ((in_features,), torch.int32)}
    _check(tensors, expected, layer, optional=("g_idx",))
    codes = _codes(tensors["qweight"].t(), bits, in_features)
    zeros = _codes(tensors["qzeros"], bits, out_features).t().to(torch.int64) + (0 if v2 else 1)
    if zeros.max() >= 2**bits:
        raise ValueError(f"{layer}: a stored zero-point of {2**bits - 1} (v1: zero {2**bits}) lies outside the "
                         f"{bits}-bit grid lowbit keeps zero-points on")
    natural = torch.arange(in_features, dtype=torch.int32) // group
    g_idx = tensors.get("g_idx", natural).to(torch.int32)
    if g_idx.min() < 0 or g_idx.max() >= G:
        raise ValueError(f"{layer}: g_idx holds groups outside 0..{G - 1}")
    scheme = QuantScheme(bits=bits, granularity=Granularity.CHANNEL if G == 1 else Granularity.GROUP,
                         group_size=None if G == 1 else group, symmetric=True)
    symmetric = sym and bool((zeros == 2 ** (bits - 1)).all())
    if not symmetric:
        scheme = replace(scheme, symmetric=False)
    if G > 1 and not torch.equal(g_idx, natural):
        scheme = replace(scheme, group_index=True)
    scale = tensors["scales"].t().contiguous()
    return _from_grid(codes, scale, None if symmetric else zeros, scheme,
                      g_idx if scheme.group_index else None, layer)


def awq_tensors(qw: QuantizedWeight, layer: str = "layer") -> dict[str, Tensor]:
    """``qweight``/``qzeros``/``scales`` of ``qw`` in AWQ's GEMM layout.

    Raises:
        ValueError: the scheme has no AWQ form (``awq_mismatch``) or ``out_features`` is not a multiple of 8.
    """
    why = awq_mismatch(qw.scheme)
    if why is not None:
        raise ValueError(f"{layer}: {qw.scheme.describe()} has no AWQ form: {why}")
    return {"qweight": _awq_words(qw.codes().t(), layer),
            "qzeros": _awq_words(_zeros(qw).to(torch.uint8).t(), layer),
            "scales": qw.scales().half().t().contiguous()}


def awq_weight(tensors: dict[str, Tensor], group_size: int, shape: tuple[int, int],
               layer: str = "layer") -> QuantizedWeight:
    """The ``QuantizedWeight`` an AWQ GEMM layer's tensors hold (int4, integer zero-points; symmetric when
    every zero is 8). Raises ``ValueError`` for a missing or misshapen tensor or a group size that does
    not divide ``in_features``."""
    out_features, in_features = shape
    if group_size <= 0 or in_features % group_size:
        raise ValueError(f"{layer}: group size {group_size} does not divide in_features={in_features}")
    G = in_features // group_size
    expected = {"qweight": ((in_features, out_features // 8), torch.int32),
                "qzeros": ((G, out_features // 8), torch.int32), "scales": ((G, out_features), None)}
    _check(tensors, expected, layer)
    codes = _awq_codes(tensors["qweight"], out_features).t()
    zeros = _awq_codes(tensors["qzeros"], out_features).t().to(torch.int64)
    symmetric = bool((zeros == 8).all())
    scheme = QuantScheme(bits=4, group_size=group_size, symmetric=symmetric)
    return _from_grid(codes, tensors["scales"].t().contiguous(), None if symmetric else zeros, scheme, None, layer)


def _awq_words(codes: Tensor, layer: str) -> Tensor:
    """uint8 4-bit codes ``[rows, out]`` -> int32 ``[rows, out / 8]`` in AWQ's column order."""
    rows, out_features = codes.shape
    if out_features % 8:
        raise ValueError(f"{layer}: AWQ packs 8 output columns per word; out_features={out_features} is not a multiple")
    ordered = codes.reshape(rows, -1, 8)[..., list(AWQ_ORDER)].reshape(rows, out_features)
    return _words(ordered, 4)


def _awq_codes(words: Tensor, out_features: int) -> Tensor:
    """Inverse of ``_awq_words``."""
    rows = words.shape[0]
    ordered = _codes(words, 4, out_features).reshape(rows, -1, 8)
    return ordered[..., list(_AWQ_UNORDER)].reshape(rows, out_features)


def _from_grid(codes: Tensor, scale: Tensor, zeros: Tensor | None, scheme: QuantScheme, g_idx: Tensor | None,
               layer: str) -> QuantizedWeight:
    """A validated ``QuantizedWeight`` from unsigned codes ``[out, in]``, scales and integer zeros ``[R, G]``."""
    if not torch.isfinite(scale.float()).all():
        raise ValueError(f"{layer}: scales hold NaN or infinity")
    data = {"qdata": pack(codes.to(torch.uint8).contiguous(), scheme.bits), "scale": scale.half().contiguous()}
    if zeros is not None:
        data["zero"] = pack(zeros.to(torch.uint8).contiguous(), scheme.bits)
    if g_idx is not None:
        data["g_idx"] = g_idx.to(torch.int32).contiguous()
    return QuantizedWeight.from_tensors(scheme, tuple(codes.shape), data)


def _check(tensors: dict[str, Tensor], expected: dict[str, tuple[tuple[int, ...], torch.dtype | None]], layer: str,
           optional: tuple[str, ...] = ()) -> None:
    """Refuse a missing tensor or one whose shape or dtype is not ``expected`` (dtype None: any float)."""
    for name, (shape, dtype) in expected.items():
        if name not in tensors:
            if name in optional:
                continue
            raise ValueError(f"{layer}: tensor {name!r} is missing")
        t = tensors[name]
        ok_dtype = t.dtype.is_floating_point if dtype is None else t.dtype == dtype
        if tuple(t.shape) != shape or not ok_dtype:
            raise ValueError(f"{layer}: tensor {name!r} is {t.dtype} {tuple(t.shape)}, expected "
                             f"{'a float' if dtype is None else dtype} {shape}")

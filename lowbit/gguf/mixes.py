"""Which GGUF type each tensor of an exported file gets: llama.cpp's ``llama-quantize`` rules.

A GGUF "file type" names a default tensor type; the mixes (``*_K_M``) then spend more bits where
quantization hurts most. These are the rules of ``llama_tensor_get_type`` and
``tensor_type_fallback`` in llama.cpp's ``src/llama-quant.cpp``, for the file types lowbit writes
and a dense (non-MoE, non-Falcon) decoder. ``i`` is the layer index, ``n`` the number of layers,
``more(i, n) = i < n//8 or i >= 7*n//8 or (i - n//8) % 3 == 2`` (llama.cpp's ``use_more_bits``):

=================================  ========  ==================  ======================  ==========
tensor                             Q3_K_M    Q4_K_M              Q5_K_M                  plain types
=================================  ========  ==================  ======================  ==========
norms, biases, every 1-D tensor    F32       F32                 F32                     F32
``output.weight`` (and tied
``token_embd.weight``) [1]         Q6_K      Q6_K                Q6_K                    default
untied ``token_embd.weight``       Q3_K      Q4_K                Q5_K                    default
``attn_v``                         Q5_K if   Q6_K if more(i,n)   Q6_K if more(i,n)       default
                                   i < 2,    else Q4_K           else Q5_K
                                   else Q4_K
``ffn_down``                       Q5_K if   Q6_K if more(i,n)   Q6_K if more(i,n)       default
                                   i < n//16 else Q4_K           else Q5_K
                                   else Q4_K
``attn_output``                    Q4_K      Q4_K                Q5_K                    default
everything else (q, k, gate, up)   Q3_K      Q4_K                Q5_K                    default
=================================  ========  ==================  ======================  ==========

[1] Q8_0 instead when the row length is not a multiple of the default type's block (256 for the
mixes): llama.cpp checks this before picking Q6_K. A Llama with 80 layers and grouped-query
attention (llama.cpp's "70B") also raises ``attn_v`` from Q3_K/Q4_K to Q5_K.

The non-uniform and ternary file types follow the same function (``gqa`` = attention heads per
key/value head, ``imatrix`` whether importance or calibration statistics were given):

=================================  ==============================  ========================  =================
tensor                             IQ4_NL, IQ4_XS                  TQ1_0, TQ2_0              IQ2_XS
=================================  ==============================  ========================  =================
``output.weight`` (tied embd) [1]  Q6_K                            Q6_K                      Q5_K
untied ``token_embd.weight``       default                         Q4_K                      Q2_K
``attn_v``                         Q5_K if gqa >= 4, else default  default                   Q4_K if gqa >= 4,
                                                                                             else Q2_K
``ffn_down``                       Q5_K if i < n//8 and no         default                   Q2_K if i < n//8
                                   imatrix, else default
everything else                    default                         default                   default
=================================  ==============================  ========================  =================

IQ2_XS needs an imatrix (importance or calibration statistics), as in llama.cpp.

MXFP4 is plain (every matrix MXFP4, stored as llama.cpp's ``MOSTLY_MXFP4_MOE``, whose own rules
would keep every tensor of a dense model in Q8_0). So is IQ3_XXS (``llama-quantize --pure IQ3_XXS``):
llama.cpp's IQ3_XXS mix moves attn_q/attn_k to IQ2_S and attn_output/embeddings to IQ3_S, types
lowbit does not write yet.

The plain types (F32 ... Q6_K) give every weight matrix that one type, like ``llama-quantize
--pure``; llama.cpp's plain file types would also move ``output.weight`` to Q6_K, which ``--pure``
and lowbit do not.

Fallback. A k-quant block spans 256 values of a row, a legacy block 32. When a tensor's row
length (its input size; SmolLM2's hidden size is 576 = 2.25 x 256) is not a multiple of the
chosen type's block, the type falls back, as ``tensor_type_fallback`` does:

===========  ========  ==================================================================
chosen       becomes   note
===========  ========  ==================================================================
Q2_K, Q3_K   Q4_0
Q4_K         Q5_0
Q5_K         Q5_1
Q6_K         Q8_0
IQ4_XS       IQ4_NL
IQ3_XXS,     IQ4_NL
IQ2_XS
TQ1_0, TQ2_0 Q4_0
32-value     F16       Q4_0 ... Q8_0, IQ4_NL, MXFP4: no smaller block to demote to
===========  ========  ==================================================================

and to F16 when the fallback does not fit either (rows not a multiple of 32).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

T = GGMLQuantizationType
_FLOATS = (T.F32, T.F16, T.BF16)


@dataclass(frozen=True)
class FileType:
    """One value of ``export_gguf``'s ``qtype``.

    Fields:
        name: the name users pass, e.g. ``"Q4_K_M"``.
        default: the type of a weight matrix no rule moves.
        ftype: llama.cpp's ``general.file_type``. A plain k-quant has no llama.cpp file type of
            its own; it is stored as the nearest one (Q3_K as Q3_K_S, Q4_K as Q4_K_S, Q5_K as
            Q5_K_S), which llama.cpp only prints.
        mix: whether llama.cpp's per-tensor rules apply (the table above); else every weight
            matrix is ``default``, as with ``llama-quantize --pure``.
    """

    name: str
    default: GGMLQuantizationType
    ftype: LlamaFileType
    mix: bool = False


FILE_TYPES: dict[str, FileType] = {
    ft.name: ft
    for ft in (
        FileType("F32", T.F32, LlamaFileType.ALL_F32),
        FileType("F16", T.F16, LlamaFileType.MOSTLY_F16),
        FileType("BF16", T.BF16, LlamaFileType.MOSTLY_BF16),
        FileType("Q8_0", T.Q8_0, LlamaFileType.MOSTLY_Q8_0),
        FileType("Q4_0", T.Q4_0, LlamaFileType.MOSTLY_Q4_0),
        FileType("Q4_1", T.Q4_1, LlamaFileType.MOSTLY_Q4_1),
        FileType("Q5_0", T.Q5_0, LlamaFileType.MOSTLY_Q5_0),
        FileType("Q5_1", T.Q5_1, LlamaFileType.MOSTLY_Q5_1),
        FileType("Q2_K", T.Q2_K, LlamaFileType.MOSTLY_Q2_K),
        FileType("Q3_K", T.Q3_K, LlamaFileType.MOSTLY_Q3_K_S),
        FileType("Q4_K", T.Q4_K, LlamaFileType.MOSTLY_Q4_K_S),
        FileType("Q5_K", T.Q5_K, LlamaFileType.MOSTLY_Q5_K_S),
        FileType("Q6_K", T.Q6_K, LlamaFileType.MOSTLY_Q6_K),
        FileType("Q3_K_M", T.Q3_K, LlamaFileType.MOSTLY_Q3_K_M, mix=True),
        FileType("Q4_K_M", T.Q4_K, LlamaFileType.MOSTLY_Q4_K_M, mix=True),
        FileType("Q5_K_M", T.Q5_K, LlamaFileType.MOSTLY_Q5_K_M, mix=True),
        FileType("IQ4_NL", T.IQ4_NL, LlamaFileType.MOSTLY_IQ4_NL, mix=True),
        FileType("IQ4_XS", T.IQ4_XS, LlamaFileType.MOSTLY_IQ4_XS, mix=True),
        FileType("MXFP4", T.MXFP4, LlamaFileType.MOSTLY_MXFP4_MOE),
        FileType("IQ3_XXS", T.IQ3_XXS, LlamaFileType.MOSTLY_IQ3_XXS),
        FileType("IQ2_XS", T.IQ2_XS, LlamaFileType.MOSTLY_IQ2_XS, mix=True),
        FileType("TQ1_0", T.TQ1_0, LlamaFileType.MOSTLY_TQ1_0, mix=True),
        FileType("TQ2_0", T.TQ2_0, LlamaFileType.MOSTLY_TQ2_0, mix=True),
    )
}

# tensor_type_fallback: a type whose block does not divide the row length -> one with 32-value blocks
_FALLBACK = {T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0,
             T.IQ4_XS: T.IQ4_NL, T.IQ3_XXS: T.IQ4_NL, T.IQ2_XS: T.IQ4_NL, T.TQ1_0: T.Q4_0, T.TQ2_0: T.Q4_0}
NEEDS_IMATRIX = frozenset({"IQ2_XS"})  # llama-quantize refuses these file types without an imatrix
_IQ4 = ("IQ4_NL", "IQ4_XS")
_TERNARY = ("TQ1_0", "TQ2_0")
_LAYER = re.compile(r"^blk\.(\d+)\.")


def file_type(name: str) -> FileType:
    """The ``FileType`` called ``name`` (case-insensitive). Raises ``ValueError`` listing the valid names."""
    ft = FILE_TYPES.get(name.upper()) if isinstance(name, str) else None
    if ft is None:
        raise ValueError(f"unknown GGUF type {name!r}; choose one of {', '.join(FILE_TYPES)}")
    return ft


@dataclass(frozen=True)
class TensorSpec:
    """What the type rules look at for one tensor.

    Fields:
        name: GGUF tensor name, e.g. ``"blk.3.attn_v.weight"``.
        shape: numpy/PyTorch order, ``[rows, cols]`` for a matrix; ``cols`` (the input size) is
            llama.cpp's ``ne[0]``, the length every block must divide.
    """

    name: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ModelShape:
    """What the mix rules look at beyond the tensor: layer count, tied embeddings, llama.cpp's "70B"
    case, attention heads per key/value head (``n_gqa``), and whether an imatrix (importance or
    calibration statistics) comes with the export (llama.cpp's ``has_imatrix``)."""

    n_layers: int
    tied_embeddings: bool
    more_v_bits: bool = False  # Llama with 80 layers and grouped-query attention
    n_gqa: int = 1
    has_imatrix: bool = False


def block_values(qtype: GGMLQuantizationType) -> int:
    """Values per block of ``qtype``: 1 for float types, 32 for legacy quants, 256 for k-quants."""
    return GGML_QUANT_SIZES[qtype][0]


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's ``use_more_bits``: the first and last eighth of the layers and every third between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def tensor_type(ft: FileType, spec: TensorSpec, model: ModelShape) -> tuple[GGMLQuantizationType, str | None]:
    """The type ``spec`` is stored in, and a one-line note when a fallback changed it (else None).

    The note reads like llama.cpp's warning: ``"blk.0.attn_q.weight: 576 columns are not a multiple
    of Q4_K's 256 -> Q5_0"``.
    """
    if len(spec.shape) < 2 or not spec.name.endswith("weight") or spec.name.endswith("_norm.weight"):
        return T.F32, None
    if ft.default in _FLOATS:
        return ft.default, None
    chosen = _mix_type(ft, spec, model) if ft.mix else ft.default
    return _fit(chosen, spec)


def _mix_type(ft: FileType, spec: TensorSpec, model: ModelShape) -> GGMLQuantizationType:
    """``llama_tensor_get_type_impl`` for the mixes (Q3_K_M .. Q5_K_M, IQ4_NL, IQ4_XS, TQ1_0, TQ2_0)
    on a dense decoder."""
    name, cols = spec.name, spec.shape[-1]
    two = ft.name == "IQ2_XS"
    if name == "output.weight" or (name == "token_embd.weight" and model.tied_embeddings):
        return T.Q8_0 if cols % block_values(ft.default) else T.Q5_K if two else T.Q6_K
    if name == "token_embd.weight" and (ft.name in _TERNARY or two):
        return T.Q2_K if two else T.Q4_K
    match = _LAYER.match(name)
    if match is None:
        return ft.default
    i, n = int(match.group(1)), model.n_layers
    three = ft.name == "Q3_K_M"
    if two:  # llama.cpp's IQ2 branch comes before the others (no 70B bump)
        if "attn_v.weight" in name:
            return T.Q4_K if model.n_gqa >= 4 else T.Q2_K
        return T.Q2_K if "ffn_down" in name and i < n // 8 else ft.default
    if "attn_v.weight" in name:
        if three:
            chosen = T.Q5_K if i < 2 else T.Q4_K
        elif ft.name in _IQ4:
            chosen = T.Q5_K if model.n_gqa >= 4 else ft.default
        elif ft.name in _TERNARY:
            chosen = ft.default
        else:
            chosen = T.Q6_K if use_more_bits(i, n) else ft.default
        return T.Q5_K if model.more_v_bits and chosen in (T.Q3_K, T.Q4_K) else chosen
    if "ffn_down" in name:
        if three:
            return T.Q5_K if i < n // 16 else T.Q4_K
        if ft.name in _IQ4:
            return T.Q5_K if i < n // 8 and not model.has_imatrix else ft.default
        if ft.name in _TERNARY:
            return ft.default
        return T.Q6_K if use_more_bits(i, n) else ft.default
    if "attn_output.weight" in name and three:
        return T.Q4_K
    return ft.default


def _fit(chosen: GGMLQuantizationType, spec: TensorSpec) -> tuple[GGMLQuantizationType, str | None]:
    """``tensor_type_fallback``: ``chosen`` if whole blocks tile a row, else its fallback (or F16)."""
    cols = spec.shape[-1]
    if cols % block_values(chosen) == 0:
        return chosen, None
    fallback = _FALLBACK.get(chosen, T.F16)
    if cols % block_values(fallback):
        fallback = T.F16
    note = (f"{spec.name}: {cols} columns are not a multiple of {chosen.name}'s {block_values(chosen)} "
            f"-> {fallback.name}")
    return fallback, note

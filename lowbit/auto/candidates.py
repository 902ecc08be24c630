"""Candidates: what a tensor may become, its exact stored cost, and its round trip for the proxy.

A ``Candidate`` is a lowbit ``QuantScheme`` (stored bits from ``qweight.FIELDS``, the same table
that counts a checkpoint's bits) or a GGUF tensor type (bytes from gguf-py's block sizes, padded to
the file's 32-byte alignment). ``fit`` says why a candidate cannot take a shape (a group size or
block that does not divide the row); the allocator skips it for that tensor and says so.

The default sets leave out float-minimum schemes in groups of 32 and GGUF Q4_1/Q5_1, Q4_K and
Q5_K: the demo models' float weights are dequantized GGUF blocks (SmolLM2: Q4_1, Gemma-3-270M and
Qwen2.5-Coder: Q4_K_M), and a candidate that re-hits the source grid would look lossless for the
wrong reason. Q4_K and Q5_K re-hit it in part: their sub-blocks of 32 carry a scale and a minimum
(6-bit, relative to the super-block's), close enough to Q4_1's float ones that on SmolLM2's block 5
``mlp.down_proj`` Q4_K's round trip (4.5 bits) leaves 1.8e-2 of the weight's norm against Q5_0's
4.3e-2 (5.5 bits) and Q6_K's 1.75e-2 (6.6 bits); on the Q4_K_M sources they are the grid itself.
Pass ``candidates=`` to ``allocate_gguf`` to give a model quantized from true float weights the
K types back. The sensitivity pass also refuses any candidate whose round trip of a tensor is
(nearly) exact (``sensitivity.SOURCE_GRID_RTOL``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from torch import Tensor

from lowbit.gguf import blocks
from lowbit.methods.awq import fake_quantize
from lowbit.methods.rtn import check_finite, quantize_rtn
from lowbit.qweight import WeightLayout, expected_tensors, storage_bits_of
from lowbit.scheme import QuantScheme

GGUF_ALIGNMENT = 32  # bytes; gguf-py's GGUF_DEFAULT_ALIGNMENT: every tensor's data starts on it


def padded_bytes(type_name: str, shape: tuple[int, ...]) -> int:
    """Bytes a GGUF tensor of ``shape`` (numpy order, rows last) and type ``type_name`` takes in the
    file, with the padding to the next tensor's aligned start."""
    values, size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    rows = 1
    for d in shape[:-1]:
        rows *= int(d)
    nbytes = rows * (int(shape[-1]) // values) * size
    return -(-nbytes // GGUF_ALIGNMENT) * GGUF_ALIGNMENT


@dataclass(frozen=True)
class Candidate:
    """A lowbit scheme (``scheme``) or a GGUF tensor type (``gguf_type``): exactly one is set."""

    name: str
    scheme: QuantScheme | None = None
    gguf_type: str | None = None

    def __post_init__(self) -> None:
        if (self.scheme is None) == (self.gguf_type is None):
            raise ValueError(f"candidate {self.name!r} is a lowbit scheme or a GGUF type, exactly one")
        if self.gguf_type is not None and self.qtype not in blocks.SUPPORTED_TYPES:
            raise ValueError(f"candidate {self.name!r}: lowbit does not write GGUF type {self.gguf_type}")

    @classmethod
    def of_scheme(cls, scheme: QuantScheme) -> Candidate:
        return cls(scheme.describe(), scheme=scheme)

    @classmethod
    def of_gguf(cls, type_name: str) -> Candidate:
        try:
            GGMLQuantizationType[type_name]
        except KeyError:
            raise ValueError(f"unknown GGUF tensor type {type_name!r}; e.g. Q4_0, Q5_0, Q8_0, Q4_K, Q6_K") from None
        return cls(type_name, gguf_type=type_name)

    @property
    def qtype(self) -> GGMLQuantizationType:
        return GGMLQuantizationType[self.gguf_type]

    def fit(self, shape: tuple[int, int]) -> str | None:
        """None when this candidate can store a weight of ``shape`` ``(out, in)``, else why not."""
        if self.scheme is not None:
            try:
                WeightLayout(self.scheme, shape)
            except ValueError as e:
                return str(e)
            return None
        values = GGML_QUANT_SIZES[self.qtype][0]
        return None if shape[1] % values == 0 else f"{shape[1]} columns are not a multiple of {self.name}'s {values}"

    def stored_bits(self, shape: tuple[int, int]) -> int:
        """Exact bits this candidate stores for a weight of ``shape`` (call ``fit`` first)."""
        if self.scheme is not None:
            return storage_bits_of(expected_tensors(WeightLayout(self.scheme, shape)))
        return padded_bytes(self.gguf_type, shape) * 8

    @torch.no_grad()
    def round_trip(self, weight: Tensor, importance: Tensor | None = None) -> Tensor:
        """``weight`` float32 ``[out, in]`` quantized by this candidate's data-free quantizer and
        dequantized: RTN for a scheme, the (importance-weighted) block search for a GGUF type."""
        if self.scheme is not None:
            if self.scheme.double_quant:  # the stored scales are quantized too: only the packed path has them
                return quantize_rtn(weight, self.scheme).dequantize()
            check_finite(weight, "weight")
            return fake_quantize(weight.float(), self.scheme)  # the same values, without packing codes
        rows = weight.detach().float().numpy()
        weights = None if importance is None else importance.detach().float().numpy()
        data = blocks.quantize_rows(rows, self.qtype, weights)
        return torch.from_numpy(np.ascontiguousarray(blocks.dequantize_rows(data, self.qtype, rows.shape[1])))


def _int(bits: int, group: int | None) -> Candidate:
    if group is None:
        return Candidate.of_scheme(QuantScheme(bits=bits, granularity="channel", group_size=None, symmetric=True))
    return Candidate.of_scheme(QuantScheme(bits=bits, group_size=group, symmetric=False))


# Block linears of a lowbit checkpoint: integer zero-points (never the Q4_1 grid), NF4, int8 per row.
LOWBIT_CANDIDATES: tuple[Candidate, ...] = (
    _int(2, 64), _int(3, 192), _int(3, 128), _int(3, 64), _int(3, 32),
    Candidate.of_scheme(QuantScheme(format="nf4", group_size=64, double_quant=True)),
    Candidate.of_scheme(QuantScheme(format="nf4", group_size=64)),
    _int(4, 32), _int(5, 64), _int(6, 64), _int(8, None),
)
# The LM head (and the embedding tied to it): the README's lm_head table found 4 bits costly here.
HEAD_CANDIDATES: tuple[Candidate, ...] = (
    Candidate.of_scheme(QuantScheme(format="nf4", group_size=64)), _int(5, 64), _int(6, 64), _int(8, None),
)
# GGUF tensor types lowbit writes, less those that re-hit the demo models' source grids (Q4_1,
# Q5_1, Q4_K, Q5_K: see the module docstring).
GGUF_CANDIDATES: tuple[Candidate, ...] = tuple(Candidate.of_gguf(t) for t in (
    "Q2_K", "Q3_K", "Q4_0", "Q5_0", "Q6_K", "Q8_0"))

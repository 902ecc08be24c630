"""CPU products for ``vq`` weights (vector and product quantization): ``prepare_vq`` once, ``linear_vq``
per call (``csrc/vq_kernels.h``).

A code stands for ``vector_dim`` consecutive weights. Where every row shares its column group's
codebook (product quantization, or one codebook per tensor), a decode product first takes the dot
product of each codebook vector with each slice of x, then sums, per output row, the products its
codes pick (one gather per 16 codes); per-row codebooks gather each unit of 16 weights from the
codebook instead. Gathers (and, for byte codes, permutes) on AVX-512; plain loops on AVX2 CPUs, where
the shared-codebook lookups still replace each code's multiply-adds with one load. No float weight
exists beyond a tile of the prefill GEMM. The weights it uses are exactly
``QuantizedWeight.dequantize``'s (float16 codebooks widened to float32 once); a sparse part is
added after the dense product as for the other formats (``cpu.sparse_rows``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lowbit.formats import FormatName
from lowbit.kernels.build import load
from lowbit.kernels.cpu import GEMM_MIN_ROWS, TILE_BYTES, UNIT, bound_product, compiled_op, sparse_rows
from lowbit.qweight import QuantizedWeight
from lowbit.quantizer import rows_shape
from lowbit.scheme import QuantScheme

VECTOR_DIMS = (1, 2, 4, 8, 16)  # dimensions whose codes tile a unit of 16 weights
PAD_BYTES = 16  # a unit's loads may read this far past the last code


def supports_vq(scheme: QuantScheme) -> str | None:
    """None when the vq kernel runs ``scheme``, else why not (one line)."""
    if scheme.format is not FormatName.VQ:
        return "the vq kernel runs vq codes only"
    if scheme.vector_dim not in VECTOR_DIMS:
        return f"the vq kernel covers vector_dim {'/'.join(map(str, VECTOR_DIMS))}, got {scheme.vector_dim}"
    if scheme.group_index:
        return "no column group index in the vq kernel"
    return load()


@dataclass(frozen=True)
class PreparedVq:
    """A ``vq`` weight laid out for ``linear_vq``.

    Fields: ``codes`` uint8, row by row (two codes per byte, low nibble first, for codes of 4 bits or
    fewer; else one per byte), then ``PAD_BYTES`` of padding; ``tables`` float32 ``[T, 2**bits *
    vector_dim]``, T = groups when every row shares its column group's codebook (``shared``), else
    rows x groups; ``tables_t``: shared tables as ``[groups, vector_dim, max(16, 2**bits)]`` (zero-padded),
    for the products-then-lookups path (one gather per 16 codes rather than per 16 weights), else
    None; ``sparse`` as ``cpu.PreparedWeight.sparse``; ``codes_t``: with shared tables and byte codes
    (more than 4 bits), the codes again with 16 rows side by side, ``[ceil(N / 16), codes per row, 16]``
    (rows zero-padded), for the row-block lookups (a gather per 16 rows from an L1-sized slice of the
    products), else None.
    """

    scheme: QuantScheme
    shape: tuple[int, int]
    device: torch.device
    codes: Tensor
    tables: Tensor
    tables_t: Tensor | None
    groups: int
    shared: bool
    tile_rows: int
    sparse: tuple[Tensor, Tensor, Tensor] | None = None
    codes_t: Tensor | None = None


def prepare_vq(qw: QuantizedWeight) -> PreparedVq:
    """Lay ``qw`` out for ``linear_vq``.

    Raises:
        ValueError: the scheme is not covered (see ``supports_vq``) or the weight is not on the CPU.
    """
    reason = supports_vq(qw.scheme)
    if reason is not None:
        raise ValueError(f"cannot prepare {qw.scheme.describe()} for the vq kernel: {reason}")
    if qw.qdata.device.type != "cpu":
        raise ValueError(f"the vq kernel needs a weight on the cpu, got one on {qw.qdata.device}; move it with .cpu()")
    N, K = qw.shape
    R, G = rows_shape(qw.shape, qw.scheme)
    codes = qw.codes()
    shared = R == 1 or qw.scheme.shared_codebook
    codes_t = None
    if shared and qw.scheme.bits > 4:  # [blocks of 16 rows, codes per row, 16]
        codes_t = F.pad(codes, (0, 0, 0, -N % 16)).reshape(-1, 16, codes.shape[1]).transpose(1, 2).contiguous()
    if qw.scheme.bits <= 4:
        codes = F.pad(codes, (0, codes.shape[1] % 2))
        codes = codes[:, 0::2] | (codes[:, 1::2] << 4)
    codebook = qw.codebook.float()
    tables = codebook.reshape(codebook.shape[0], -1).contiguous()
    tables_t = None
    if shared:  # [groups, vector_dim, entries], entries zero-padded to a whole vector of 16
        entries = codebook.shape[1]
        tables_t = F.pad(codebook.transpose(1, 2), (0, max(UNIT, entries) - entries)).contiguous()
    tile_rows = max(UNIT, TILE_BYTES // (K * 4) // UNIT * UNIT)
    return PreparedVq(qw.scheme, qw.shape, qw.qdata.device,
                      torch.cat([codes.reshape(-1), torch.zeros(PAD_BYTES, dtype=torch.uint8)]), tables, tables_t, G,
                      shared, tile_rows, sparse_rows(qw), codes_t)


def bind_vq(prepared: PreparedVq, bias: Tensor | None) -> Callable[[Tensor], Tensor]:
    """``x2 -> linear_vq(x2, prepared, bias)`` for a contiguous float32 ``[M, in]`` ``x2``."""
    op = compiled_op("linear_vq")
    args = (prepared.codes, prepared.tables, prepared.tables_t, prepared.codes_t, prepared.scheme.bits,
            prepared.scheme.vector_dim, prepared.groups,
            prepared.shared, prepared.shape[0], None if bias is None else bias.float().contiguous(), GEMM_MIN_ROWS,
            prepared.tile_rows)
    return bound_product(op, args, prepared.sparse)


def linear_vq(x: Tensor, prepared: PreparedVq, bias: Tensor | None) -> Tensor:
    """``x [..., in] @ W^T + bias`` in ``x``'s dtype, computed in float32 (the reference's result up to
    summation order). No autograd: an inference path.

    Raises:
        ValueError: ``x`` is on another device than the layout was prepared for, or has the wrong width.
    """
    if x.device != prepared.device:
        raise ValueError(f"this weight layout was prepared for {prepared.device}, got x on {x.device}; "
                         f"prepare the weight again for {x.device}")
    N, K = prepared.shape
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {K}")
    x2 = x.reshape(-1, K)
    if x2.dtype != torch.float32 or not x2.is_contiguous():
        x2 = x2.float().contiguous()
    y = bind_vq(prepared, bias)(x2).reshape(*x.shape[:-1], N)
    return y if x.dtype == torch.float32 else y.to(x.dtype)


__all__ = ["PreparedVq", "VECTOR_DIMS", "bind_vq", "linear_vq", "prepare_vq", "supports_vq"]

"""Fast CPU matrix products for lowbit's stored weight formats: ``prepare`` once, ``linear`` per call.

``prepare`` re-lays a ``QuantizedWeight`` for the kernels of ``csrc/lowbit_cpu.cpp``: codes in
units of 16 per group (each group zero-padded to a multiple of 16 codes; 4-bit units interleaved
as ``csrc/simd_ops.h`` describes, 3-bit units keep lowbit's 8-codes-in-3-bytes packing), scales
decoded to float32 (double quantization undone once), the zero-points or float minimums as
float32, and the 16 values codes stand for before scaling. The checkpoint's layout is untouched.

``linear`` decodes exactly the float32 weights ``QuantizedWeight.dequantize`` gives, so its result
differs from the reference (``F.linear(x, qw.dequantize(), b)``) only by float32 summation order.
Covered: int3, int4, int8 (symmetric, integer zero-point, float minimum; per tensor, per channel
and groups of any size), NF4/FP4 (with or without double quantization) and 3- and 4-bit ``lut``
codebooks (SqueezeLLM's per-row tables: each group decodes through its own table), each with or
without a sparse part (exact outliers, added by ``sparse_accumulate_`` after the dense product). ``linear_bf16_prefill``
is the named, inexact option: prefill products in bfloat16.

A prepared int4 g64 weight holds about 5 bits per weight (codes plus float32 scale and zero per
group) beside the module's stored buffers, which checkpoints keep reading.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from lowbit.formats import FormatName, pack
from lowbit.kernels.build import load
from lowbit.qweight import QuantizedWeight
from lowbit.quantizer import rows_shape
from lowbit.scheme import QuantScheme, ZeroPoint

KERNEL_BITS = {FormatName.INT: (3, 4, 8), FormatName.NF4: (4,), FormatName.FP4: (4,), FormatName.LUT: (3, 4)}
INT8_ACTIVATION_BITS = (3, 4, 8)  # integer codes only: NF4/FP4 values are not integers
BLOCK = 64  # codes per int8 dot-product block (csrc/int8_activations.h); groups must hold whole blocks
PANEL = 4  # rows the int8-activation layout interleaves block by block
# activations -> bits x is rounded to for few rows (csrc/int8_activations.h): int8, or int16 as two int8 halves
INTEGER_ACTIVATIONS = {"int8": 8, "int16": 16}
UNIT = 16  # codes per unit: one AVX-512 vector, two AVX2 vectors
MODE_LUT, MODE_INT, MODE_FMIN = 0, 1, 2  # w = table[q] s;  w = (q - z) s;  w = q s + m  (csrc/kernel_body.h)
GEMM_MIN_ROWS = 24  # from this many rows of x on, tiles into a GEMM beat the fused kernel (measured: M = 16 vs 32)
TILE_BYTES = 1 << 19  # float32 weight tile of the GEMM path: stays in a 1 MiB L2 beside x's panel


def supports(scheme: QuantScheme, activations: str = "float32") -> str | None:
    """None when a CPU kernel runs this scheme with ``activations`` ("float32": exact; "int8" or "int16":
    x rounded per block of 64 for few rows, see ``int8_activations_reason``), else the reason (one line)."""
    if activations in INTEGER_ACTIVATIONS:
        return int8_activations_reason(scheme)
    bits = KERNEL_BITS.get(scheme.format)
    if bits is None:
        covered = ", ".join(f"{f.value} {'/'.join(map(str, b))}-bit" for f, b in KERNEL_BITS.items())
        return f"no CPU kernel for {scheme.format.value} codes (kernels cover {covered})"
    if scheme.bits not in bits:
        return f"no CPU kernel for {scheme.bits}-bit {scheme.format.value} (kernels cover bits {bits})"
    return None


def int8_activations_reason(scheme: QuantScheme) -> str | None:
    """None when the int8-activation kernels can run ``scheme`` on this CPU, else why not. Per channel or
    per tensor, a width that is not a multiple of 64 is found only by ``prepare``, which then keeps x in
    float32."""
    if scheme.format is not FormatName.INT or scheme.bits not in INT8_ACTIVATION_BITS:
        return f"int8 activations need integer codes of {'/'.join(map(str, INT8_ACTIVATION_BITS))} bits"
    if scheme.group_size and scheme.group_size % BLOCK:
        return f"int8 activations need groups of a multiple of {BLOCK} weights, got {scheme.group_size}"
    problem = load()
    if problem is not None:
        return problem
    if not torch.ops.lowbit_kernels.int8_activations_supported():
        return "int8 activations need AVX-512 VNNI, which this CPU lacks"
    return None


@dataclass(frozen=True)
class PreparedWeight:
    """A weight laid out for ``linear``; made by ``prepare`` for one device.

    Fields (N = out_features, G = groups per row, g = in_features / G, g16 = g rounded up to 16):
        codes: uint8, flat: N rows of ``G * g16 * bits / 8`` bytes, then 8 bytes of padding.
        scale: float32 ``[N, G]``.
        zsub: float32 ``[N, G]`` subtracted from integer codes (grid offset or zero-point), or None.
        fmin: float32 ``[N, G]`` float minimums (``ZeroPoint.FLOAT``), or None.
        lut: float32 ``[16]``: what codes 0..15 stand for before scaling (the NF4/FP4 table; the
            codes themselves for int, 3-bit codes repeated twice); None for 8 bits. For ``lut``
            codebooks ``[N * G, 16]``: each group's own table (3-bit tables repeated twice), scale 1.
        mode: ``MODE_LUT`` (NF4, FP4), ``MODE_INT`` (``(q - zsub) s``) or ``MODE_FMIN`` (``q s + fmin``).
        group, group_padded: g and g16.
        tile_rows: output rows per dequantized tile of the prefill path (``TILE_BYTES`` of float32).
        device: where the layout lives; ``linear`` refuses inputs elsewhere.
        activations: "float32" (the layout above), or "int8" / "int16" (the bits x is rounded to per
            block of 64 in products of few rows): then codes are in the block layout of
            ``csrc/int8_activations.h`` (rows zero-padded to whole panels of 4, as are ``scale``,
            ``zsub``, ``fmin`` and ``corr``; ``group`` a multiple of 64), ``corr`` holds ``-scale * zsub``
            or ``fmin``, and ``lut`` is None.
    """

    scheme: QuantScheme
    shape: tuple[int, int]
    device: torch.device
    codes: Tensor
    scale: Tensor
    zsub: Tensor | None
    fmin: Tensor | None
    lut: Tensor | None
    mode: int
    group: int
    group_padded: int
    tile_rows: int
    activations: str = "float32"
    corr: Tensor | None = None
    sparse: tuple[Tensor, Tensor, Tensor] | None = None


def prepare(qw: QuantizedWeight, activations: str = "float32") -> PreparedWeight:
    """Lay ``qw`` out for ``linear`` (an explicit step: call it once, at load or after quantizing).
    With ``activations`` "int8" or "int16", for the integer-activation kernels where the weight's width
    allows (blocks of 64), else as for float32.

    Raises:
        ValueError: no kernel covers the scheme (see ``supports``), or the weight is not on the CPU.
    """
    scheme = qw.scheme
    reason = supports(scheme, activations)
    if reason is not None:
        raise ValueError(f"cannot prepare {scheme.describe()} for the CPU kernels: {reason}")
    device = qw.qdata.device
    if device.type != "cpu":
        raise ValueError(f"the CPU kernels need a weight on the cpu, got one on {device}; move it with .cpu() first")
    N, K = qw.shape
    R, G = rows_shape(qw.shape, scheme)
    group = K // G
    group_padded = -(-group // UNIT) * UNIT
    fmt = scheme.number_format()
    zeros = qw.zeros()

    def per_row(t: Tensor) -> Tensor:  # [R, G] -> [N, G]: a per-tensor value repeated for each row
        return t.reshape(R, G).expand(N, G).contiguous().float()

    zsub = fmin = None
    sparse = sparse_rows(qw)
    lut = torch.arange(UNIT, dtype=torch.float32) % 2**scheme.bits if scheme.bits < 8 else None
    if scheme.format is FormatName.LUT:  # each group's own table, repeated to 16 entries; w = table[q] * 1
        tables = qw.codebook.float().reshape(R, G, -1).expand(N, G, -1).reshape(N * G, -1)
        mode, lut = MODE_LUT, tables.repeat(1, UNIT // tables.shape[1]).contiguous()
    elif scheme.format is not FormatName.INT:
        mode, lut = MODE_LUT, fmt.decode(torch.arange(UNIT, dtype=torch.uint8)).float().contiguous()
    elif scheme.symmetric:
        mode, zsub = MODE_INT, torch.full((N, G), float(fmt.offset))  # (q - offset) s, as fmt.decode then scale
    elif scheme.zero_point is ZeroPoint.INT:
        mode, zsub = MODE_INT, per_row(zeros)  # the unsigned grid has no offset: (q - z) s
    else:
        mode, fmin = MODE_FMIN, per_row(zeros)
    scale = torch.ones(N, G) if scheme.format is FormatName.LUT else per_row(qw.scales())
    tile_rows = max(UNIT, TILE_BYTES // (G * group_padded * 4) // UNIT * UNIT)
    if activations in INTEGER_ACTIVATIONS and group % BLOCK == 0:
        def panels(t: Tensor | None) -> Tensor | None:  # rows zero-padded to whole panels
            return None if t is None else F.pad(t, (0, 0, 0, -N % PANEL))

        corr = fmin if fmin is not None else -(scale * zsub)
        return PreparedWeight(scheme, qw.shape, device, _block_codes(qw, G, group), panels(scale), panels(zsub),
                              panels(fmin), None, mode, group, group, tile_rows, activations, panels(corr), sparse)
    return PreparedWeight(scheme, qw.shape, device, _relay_codes(qw, G, group, group_padded), scale, zsub, fmin,
                          lut, mode, group, group_padded, tile_rows, sparse=sparse)


def sparse_rows(qw: QuantizedWeight) -> tuple[Tensor, Tensor, Tensor] | None:
    """The sparse part in compressed rows (``PreparedWeight.sparse``), or None without one."""
    if qw.outlier_values is None or not qw.outlier_values.numel():
        return None
    N, K = qw.shape
    index = qw.outlier_index.long()  # ascending flat positions row * K + column
    counts = torch.bincount(index // K, minlength=N)
    row_ptr = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    return row_ptr, (index % K).contiguous(), qw.outlier_values.float().contiguous()


def _relay_codes(qw: QuantizedWeight, G: int, group: int, group_padded: int) -> Tensor:
    """The kernel's code layout (see ``PreparedWeight.codes``) from the portable one."""
    N = qw.shape[0]
    bits = qw.scheme.bits
    codes = F.pad(qw.codes().reshape(N, G, group), (0, group_padded - group)).reshape(N, -1)
    if bits == 4:  # bytes 0-3: codes 0, 4, 8, 12 low and 2, 6, 10, 14 high; bytes 4-7: the odd codes
        units = codes.reshape(N, -1, UNIT // 4, 2, 2)  # [.., 4k + 2h + e] -> [.., k, h, e]
        rows = (units[..., 0, :] | (units[..., 1, :] << 4)).transpose(-1, -2)
    elif bits == 3:
        rows = pack(codes, 3)  # whole 8-code units: a unit of 16 codes is 6 bytes of lowbit's packing
    else:
        rows = codes
    return torch.cat([rows.reshape(-1), torch.zeros(8, dtype=torch.uint8)])


def _block_codes(qw: QuantizedWeight, G: int, group: int) -> Tensor:
    """The int8-activation kernels' code layout (``csrc/int8_activations.h``) from the portable one."""
    N = qw.shape[0]
    codes = qw.codes().reshape(N, G * group // BLOCK, BLOCK).to(torch.uint8)
    if qw.scheme.bits == 4:  # byte j: code j low, code j + 32 high
        blocks = codes[..., :32] | (codes[..., 32:] << 4)
    elif qw.scheme.bits == 3:  # 16 bytes of 2-bit fields (byte j: codes j, j+16, j+32, j+48), 8 bytes of bit 2
        low = codes & 3
        fields = low[..., 0:16] | (low[..., 16:32] << 2) | (low[..., 32:48] << 4) | (low[..., 48:64] << 6)
        high = ((codes >> 2) & 1).reshape(N, -1, 8, 8) << torch.arange(8, dtype=torch.uint8)
        blocks = torch.cat([fields, high.sum(-1, dtype=torch.uint8)], dim=-1)
    else:
        blocks = codes
    blocks = F.pad(blocks, (0, 0, 0, 0, 0, -N % PANEL))  # [N', blocks, bytes] -> panels, block-major within
    return blocks.reshape(-1, PANEL, *blocks.shape[1:]).transpose(1, 2).reshape(-1).contiguous()


def concatenate(layouts: Sequence[PreparedWeight]) -> PreparedWeight | None:
    """One layout whose product is the given layouts' products side by side (their output rows
    stacked in order), so sibling layers reading the same input (q/k/v, gate/up) cost one call; None
    when their formats, input widths or devices differ. The result is a new copy of the codes."""
    first = layouts[0]
    key = (first.scheme.bits, first.mode, first.group, first.group_padded, first.shape[1], first.device,
           first.activations)
    if any((p.scheme.bits, p.mode, p.group, p.group_padded, p.shape[1], p.device, p.activations) != key
           for p in layouts):
        return None
    per_group_tables = first.lut is not None and first.lut.dim() == 2
    if any(p.lut is not None and (p.lut.dim() == 2) != per_group_tables for p in layouts):
        return None
    if first.lut is not None and not per_group_tables and any(not torch.equal(p.lut, first.lut) for p in layouts):
        return None
    if first.activations in INTEGER_ACTIVATIONS and any(p.shape[0] % PANEL for p in layouts[:-1]):
        return None  # a padded panel inside the stack would shift the rows after it

    def stacked(name: str) -> Tensor | None:
        parts = [getattr(p, name) for p in layouts]
        return None if parts[0] is None else torch.cat(parts)

    pad = 8 if first.activations == "float32" else 0  # the float layout's tail pad, kept once at the end
    codes = torch.cat([p.codes[:p.codes.numel() - pad] for p in layouts] + [first.codes[first.codes.numel() - pad:]])
    lut = stacked("lut") if per_group_tables else first.lut
    return PreparedWeight(first.scheme, (sum(p.shape[0] for p in layouts), first.shape[1]), first.device, codes,
                          stacked("scale"), stacked("zsub"), stacked("fmin"), lut, first.mode, first.group,
                          first.group_padded, first.tile_rows, first.activations, stacked("corr"),
                          _stacked_sparse(layouts))


def _stacked_sparse(layouts: Sequence[PreparedWeight]) -> tuple[Tensor, Tensor, Tensor] | None:
    """The sparse parts of layouts stacked by output rows (a layout without one contributes empty rows)."""
    if all(p.sparse is None for p in layouts):
        return None
    row_ptrs, cols, values, offset = [torch.zeros(1, dtype=torch.long)], [], [], 0
    for p in layouts:
        row_ptr, c, v = p.sparse if p.sparse is not None else (
            torch.zeros(p.shape[0] + 1, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0))
        row_ptrs.append(row_ptr[1:] + offset)
        cols.append(c)
        values.append(v)
        offset += int(row_ptr[-1])
    return torch.cat(row_ptrs), torch.cat(cols), torch.cat(values)


def bind(prepared: PreparedWeight, bias: Tensor | None) -> Callable[[Tensor], Tensor]:
    """``x2 -> linear(x2, prepared, bias)`` for a contiguous float32 ``[M, in]`` ``x2``, without the
    per-call checks and reshapes of ``linear``: for loops that already guarantee its input."""
    op, args = _call(prepared, None if bias is None else bias.float().contiguous(), bf16_gemm=False)
    return bound_product(op, args, prepared.sparse)


def bound_product(op: Callable[..., Tensor], args: tuple,
                  sparse: tuple[Tensor, Tensor, Tensor] | None) -> Callable[[Tensor], Tensor]:
    """``x2 -> op(x2, *args)``, plus the weight's sparse part (``sparse_rows``) when it has one."""
    if sparse is None:
        return lambda x2: op(x2, *args)
    add_sparse = compiled_op("sparse_accumulate_")

    def product(x2: Tensor) -> Tensor:
        y = op(x2, *args)
        add_sparse(y, x2, *sparse)
        return y
    return product


def _call(prepared: PreparedWeight, bias: Tensor | None, bf16_gemm: bool) -> tuple[Callable[..., Tensor], tuple]:
    """The operator for ``prepared`` and its arguments after x."""
    if prepared.activations in INTEGER_ACTIVATIONS:
        return compiled_op("linear_int8x"), (prepared.codes, prepared.scale, prepared.corr, prepared.zsub,
                                           prepared.fmin, prepared.scheme.bits, prepared.group, prepared.shape[0],
                                           INTEGER_ACTIVATIONS[prepared.activations], bias, GEMM_MIN_ROWS,
                                           prepared.tile_rows)
    return compiled_op("linear"), (prepared.codes, prepared.scale, prepared.zsub, prepared.fmin, prepared.lut,
                                 prepared.scheme.bits, prepared.mode, prepared.group, prepared.group_padded, bias,
                                 GEMM_MIN_ROWS, prepared.tile_rows, bf16_gemm)


def linear(x: Tensor, prepared: PreparedWeight, bias: Tensor | None) -> Tensor:
    """``x [..., in] @ W^T + bias -> [..., out]`` in ``x``'s dtype, computed in float32 (the reference's
    result up to summation order), threads from ``torch.get_num_threads()``. No autograd: an
    inference path.

    Raises:
        ValueError: ``x`` is on another device than the layout was prepared for, or has the wrong width.
        RuntimeError: the compiled kernels are not available (``lowbit.kernels.status()`` says why).
    """
    return _linear(x, prepared, bias, bf16_gemm=False)


def linear_bf16_prefill(x: Tensor, prepared: PreparedWeight, bias: Tensor | None) -> Tensor:
    """``linear``, except that products of ``GEMM_MIN_ROWS`` rows or more (prefill) run as bfloat16
    GEMMs: x, the dequantized weights and the output sums are rounded to bfloat16 (8 significant
    bits), for 2-4x float32's speed on CPUs with AVX512-BF16 or AMX. Fewer rows (decode) take the
    exact float32 kernels. An option, not a default: its quality cost must be measured per model.
    """
    return _linear(x, prepared, bias, bf16_gemm=True)


def _linear(x: Tensor, prepared: PreparedWeight, bias: Tensor | None, bf16_gemm: bool) -> Tensor:
    if x.device != prepared.device:
        raise ValueError(f"this weight layout was prepared for {prepared.device}, got x on {x.device}; "
                         f"prepare the weight again for {x.device}")
    N, K = prepared.shape
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {K}")
    x2 = x if x.dim() == 2 else x.reshape(-1, K)
    if x2.dtype != torch.float32 or not x2.is_contiguous():
        x2 = x2.float().contiguous()
    if bias is not None and bias.dtype != torch.float32:
        bias = bias.float()
    op, args = _call(prepared, bias, bf16_gemm)
    y = bound_product(op, args, prepared.sparse)(x2)
    if x.dim() != 2:
        y = y.reshape(*x.shape[:-1], N)
    return y if x.dtype == torch.float32 else y.to(x.dtype)


@lru_cache(maxsize=None)
def compiled_op(name: str):
    """The compiled ``lowbit_kernels::<name>`` (resolved once: per-call lookup costs microseconds)."""
    problem = load()
    if problem is not None:
        raise RuntimeError(f"lowbit CPU kernels unavailable ({problem}); use the reference path")
    qualified = f"lowbit_kernels::{name}"
    if not torch._C._dispatch_has_kernel_for_dispatch_key(qualified, "Meta"):
        torch.library.register_fake(qualified)(_SHAPES[name])
    return getattr(torch.ops.lowbit_kernels, name).default


def _linear_shape(x: Tensor, codes: Tensor, scale: Tensor, *args) -> Tensor:
    """The output ``lowbit_kernels::linear`` makes, without computing it: what torch.compile traces."""
    return x.new_empty((x.shape[0], scale.shape[0]))


def _linear_int8x_shape(x: Tensor, codes: Tensor, scale: Tensor, corr: Tensor, zsub: Tensor | None,
                        fmin: Tensor | None, bits: int, group: int, out_features: int, *args) -> Tensor:
    """``_linear_shape`` for ``lowbit_kernels::linear_int8x``, whose scales are padded to whole panels."""
    return x.new_empty((x.shape[0], out_features))


def _sparse_accumulate_shape(y: Tensor, *args) -> None:
    """``lowbit_kernels::sparse_accumulate_`` adds into ``y`` in place and returns nothing."""


def _linear_vq_shape(x: Tensor, codes: Tensor, tables: Tensor, tables_t: Tensor | None, codes_t: Tensor | None,
                     bits: int, vector_dim: int, groups: int, shared: bool, out_features: int, *args) -> Tensor:
    """``_linear_shape`` for ``lowbit_kernels::linear_vq`` (``lowbit/kernels/vq.py``)."""
    return x.new_empty((x.shape[0], out_features))


_SHAPES = {"linear": _linear_shape, "linear_int8x": _linear_int8x_shape, "linear_vq": _linear_vq_shape,
           "sparse_accumulate_": _sparse_accumulate_shape}

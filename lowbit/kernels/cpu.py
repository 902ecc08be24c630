"""Fast CPU matrix products for lowbit's stored weight formats: ``prepare`` once, ``linear`` per call.

``prepare`` re-lays a ``QuantizedWeight`` for the kernels of ``csrc/lowbit_cpu.cpp``: codes in
units of 16 per group (each group zero-padded to a multiple of 16 codes; 4-bit units interleaved
as ``csrc/simd_ops.h`` describes, 3-bit units keep lowbit's 8-codes-in-3-bytes packing), scales
decoded to float32 (double quantization undone once), the zero-points or float minimums as
float32, and the 16 values codes stand for before scaling. The checkpoint's layout is untouched.

``linear`` decodes exactly the float32 weights ``QuantizedWeight.dequantize`` gives, so its result
differs from the reference (``F.linear(x, qw.dequantize(), b)``) only by float32 summation order.
Covered: int3, int4, int8 (symmetric, integer zero-point, float minimum; per tensor, per channel
and groups of any size) and NF4/FP4 (with or without double quantization). ``linear_bf16_prefill``
is the named, inexact option: prefill products in bfloat16.

A prepared int4 g64 weight holds about 5 bits per weight (codes plus float32 scale and zero per
group) beside the module's stored buffers, which checkpoints keep reading.
"""

from __future__ import annotations

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

KERNEL_BITS = {FormatName.INT: (3, 4, 8), FormatName.NF4: (4,), FormatName.FP4: (4,)}
UNIT = 16  # codes per unit: one AVX-512 vector, two AVX2 vectors
MODE_LUT, MODE_INT, MODE_FMIN = 0, 1, 2  # w = table[q] s;  w = (q - z) s;  w = q s + m  (csrc/kernel_body.h)
GEMM_MIN_ROWS = 24  # from this many rows of x on, tiles into a GEMM beat the fused kernel (measured: M = 16 vs 32)
TILE_BYTES = 1 << 19  # float32 weight tile of the GEMM path: stays in a 1 MiB L2 beside x's panel


def supports(scheme: QuantScheme) -> str | None:
    """None when a CPU kernel runs this scheme, else the reason (one line)."""
    bits = KERNEL_BITS.get(scheme.format)
    if bits is None:
        covered = ", ".join(f"{f.value} {'/'.join(map(str, b))}-bit" for f, b in KERNEL_BITS.items())
        return f"no CPU kernel for {scheme.format.value} codes (kernels cover {covered})"
    if scheme.bits not in bits:
        return f"no CPU kernel for {scheme.bits}-bit {scheme.format.value} (kernels cover bits {bits})"
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
            codes themselves for int, 3-bit codes repeated twice); None for 8 bits.
        mode: ``MODE_LUT`` (NF4, FP4), ``MODE_INT`` (``(q - zsub) s``) or ``MODE_FMIN`` (``q s + fmin``).
        group, group_padded: g and g16.
        tile_rows: output rows per dequantized tile of the prefill path (``TILE_BYTES`` of float32).
        device: where the layout lives; ``linear`` refuses inputs elsewhere.
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


def prepare(qw: QuantizedWeight) -> PreparedWeight:
    """Lay ``qw`` out for ``linear`` (an explicit step: call it once, at load or after quantizing).

    Raises:
        ValueError: no kernel covers the scheme (see ``supports``), or the weight is not on the CPU.
    """
    scheme = qw.scheme
    reason = supports(scheme)
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
    lut = torch.arange(UNIT, dtype=torch.float32) % 2**scheme.bits if scheme.bits < 8 else None
    if scheme.format is not FormatName.INT:
        mode, lut = MODE_LUT, fmt.decode(torch.arange(UNIT, dtype=torch.uint8)).float().contiguous()
    elif scheme.symmetric:
        mode, zsub = MODE_INT, torch.full((N, G), float(fmt.offset))  # (q - offset) s, as fmt.decode then scale
    elif scheme.zero_point is ZeroPoint.INT:
        mode, zsub = MODE_INT, per_row(zeros)  # the unsigned grid has no offset: (q - z) s
    else:
        mode, fmin = MODE_FMIN, per_row(zeros)
    return PreparedWeight(scheme, qw.shape, device, _relay_codes(qw, G, group, group_padded),
                          per_row(qw.scales()), zsub, fmin, lut, mode, group, group_padded,
                          max(UNIT, TILE_BYTES // (G * group_padded * 4) // UNIT * UNIT))


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
    op = _operator()
    x2 = x if x.dim() == 2 else x.reshape(-1, K)
    if x2.dtype != torch.float32 or not x2.is_contiguous():
        x2 = x2.float().contiguous()
    if bias is not None and bias.dtype != torch.float32:
        bias = bias.float()
    y = op(x2, prepared.codes, prepared.scale, prepared.zsub, prepared.fmin, prepared.lut, prepared.scheme.bits,
           prepared.mode, prepared.group, prepared.group_padded, bias, GEMM_MIN_ROWS, prepared.tile_rows, bf16_gemm)
    if x.dim() != 2:
        y = y.reshape(*x.shape[:-1], N)
    return y if x.dtype == torch.float32 else y.to(x.dtype)


@lru_cache(maxsize=1)
def _operator():
    """The compiled ``lowbit_kernels::linear`` (resolved once: per-call lookup costs microseconds)."""
    problem = load()
    if problem is not None:
        raise RuntimeError(f"lowbit CPU kernels unavailable ({problem}); use the reference path")
    return torch.ops.lowbit_kernels.linear.default

"""Which lowbit schemes ONNX Runtime's operators hold exactly, and MatMulNBits' block size; no onnx import,
so ``lowbit export --check --to onnx`` works without onnx installed."""

from __future__ import annotations

from lowbit.formats import FormatName
from lowbit.scheme import Granularity, QuantScheme, ZeroPoint

NBITS_BLOCKS = (256, 128, 64, 32, 16)  # MatMulNBits' block sizes: powers of two from 16


def onnx_mismatch(scheme: QuantScheme) -> str | None:
    """None when a weight of ``scheme`` is written with its own codes and scales, else why ONNX
    Runtime has no operator for it (one clause)."""
    if scheme.format is not FormatName.INT:
        return (f"{scheme.format.value} codes are not an integer grid; MatMulNBits and DequantizeLinear "
                "read integer codes with scales and zero-points")
    if scheme.bits not in (4, 8):
        return f"int{scheme.bits}: only 4-bit and 8-bit codes are written (MatMulNBits, DequantizeLinear)"
    if not scheme.symmetric and scheme.zero_point is ZeroPoint.FLOAT:
        return ("a float minimum (w = s q + m) is no integer zero-point; MatMulNBits and DequantizeLinear "
                "compute s (q - z) with integer z (quantize with --zero-point int)")
    if scheme.group_index:
        return "act-order group indices (g_idx) are not written; quantize without act-order or with static groups"
    if scheme.sparse:
        return "a sparse part of float outliers has no ONNX Runtime operator beside the quantized matmul"
    if scheme.bits == 4 and scheme.granularity is Granularity.GROUP and scheme.group_size not in NBITS_BLOCKS:
        return f"MatMulNBits blocks are 16, 32, 64, 128 or 256 weights, not groups of {scheme.group_size}"
    return None


def nbits_block(scheme: QuantScheme, in_features: int) -> int | None:
    """The MatMulNBits block size for a weight of ``scheme`` with ``in_features`` inputs: its group size,
    or for per-channel and per-tensor scales (repeated over blocks) the largest of ``NBITS_BLOCKS``
    dividing ``in_features``; None when there is none (8-bit weights then go through DequantizeLinear)."""
    if scheme.granularity is Granularity.GROUP:
        return int(scheme.group_size) if scheme.group_size in NBITS_BLOCKS else None
    return next((block for block in NBITS_BLOCKS if in_features % block == 0), None)


def check_nbits_block(scheme: QuantScheme, in_features: int) -> None:
    """Raise ``ValueError`` when a 4-bit weight (MatMulNBits only) has no block size (``nbits_block``)."""
    if scheme.bits == 4 and nbits_block(scheme, in_features) is None:
        raise ValueError(f"{scheme.describe()} with in_features={in_features}: MatMulNBits needs a block of 16 to 256 "
                     "weights dividing it; quantize with groups (e.g. --group-size 32)")

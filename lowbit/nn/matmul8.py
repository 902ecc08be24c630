"""8-bit matrix products: int8 x int8 -> int32, and FP8 E4M3 x FP8 E4M3 -> float32, with scales.

int8 runs ``torch._int_mm`` (oneDNN / VNNI on x86 CPUs, cuBLASLt on CUDA). FP8 runs
``torch._scaled_mm`` on CUDA (cuBLASLt, Hopper and Ada GPUs); on CPUs, which have no FP8 arithmetic,
oneDNN's ``_scaled_mm`` measured 1.2-33x slower than float32 MKL (``bench/matmul8.py``), so there the
E4M3 operands are widened to float32 and multiplied by MKL. Both have an exact fallback:

- int8: the int32 accumulation is exact in any order (|sum| < 2**31 for K < 2**17), so the
  fallback ``int32 @ int32`` equals the kernel bit for bit.
- FP8: the product of two E4M3 values has at most 8 significant bits and is exact in float32;
  only the float32 accumulation order differs between the kernel and the fallback.
"""

from __future__ import annotations

import torch
from torch import Tensor

_INT_MM_OK: dict[torch.device, bool] = {}
_SCALED_MM_OK: dict[torch.device, bool] = {}


def int8_matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a [M, K] int8 @ b [K, N] int8 -> int32 [M, N]``, exact."""
    if _INT_MM_OK.get(a.device, True):
        try:
            return torch._int_mm(a, b)
        except RuntimeError:  # shape or device the kernel does not take (e.g. CUDA wants M > 16)
            if a.device.type != "cuda":
                _INT_MM_OK[a.device] = False
    return a.to(torch.int32) @ b.to(torch.int32)


def scaled_int8_matmul(a: Tensor, scale_a: Tensor, b: Tensor, scale_b: Tensor) -> Tensor:
    """``(a * scale_a) @ (b * scale_b)`` in float32 from int8 ``a [M, K]``, ``b [K, N]`` and float32
    scales ``scale_a [M, 1]``, ``scale_b [1, N]``."""
    return int8_matmul(a, b).float().mul_(scale_a).mul_(scale_b)


def scaled_fp8_matmul(a: Tensor, scale_a: Tensor, b: Tensor, scale_b: Tensor) -> Tensor:
    """``(a * scale_a) @ (b * scale_b)`` in float32 from ``float8_e4m3fn`` ``a [M, K]``, ``b [K, N]``
    and float32 scales ``scale_a [M, 1]``, ``scale_b [1, N]``."""
    if a.device.type == "cuda" and _SCALED_MM_OK.get(a.device, True):
        try:
            return torch._scaled_mm(a, b, scale_a=scale_a.contiguous(), scale_b=scale_b.contiguous(),
                                    out_dtype=torch.float32)
        except RuntimeError:
            _SCALED_MM_OK[a.device] = False
    return (a.float() @ b.float()).mul_(scale_a).mul_(scale_b)

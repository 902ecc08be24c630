"""Fast matrix products for quantized weights, behind ``prepare`` (once) and ``linear`` (per call).

``status()`` says whether the compiled part is usable here; when it is not (no compiler at set-up,
a CPU without AVX2, ``LOWBIT_KERNELS=0``), callers use the reference path, dequantize + ``F.linear``.
"""

from lowbit.kernels.build import load
from lowbit.kernels.cpu import (
    PreparedWeight,
    int8_activations_reason,
    linear,
    linear_bf16_prefill,
    prepare,
    supports,
)


def status() -> str | None:
    """None when the compiled kernels are usable, else one line saying why not (builds on first call)."""
    return load()


__all__ = ["PreparedWeight", "int8_activations_reason", "linear", "linear_bf16_prefill", "prepare", "status",
           "supports"]

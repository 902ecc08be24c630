"""IQ4_NL, llama.cpp's 4-bit non-linear grid: sixteen integers, a weight is ``d * kvalues[code]``.

The table is ggml-common.h's ``kvalues_iq4nl`` (gguf-py ``IQ4_NL.kvalues``): not symmetric, denser
near zero, like NF4 but on integers, so ``d * value`` in float32 is what llama.cpp computes. As a lowbit
format it lets GGUF's IQ4_NL blocks (scale ``d`` per 32 weights) and IQ4_XS super-blocks (two-level
scales, signed 6-bit sub-scales) be read as codes and written back unchanged.
"""

from __future__ import annotations

from lowbit.formats.base import FormatName, register_format
from lowbit.formats.nf4 import LookupFormat

IQ4_NL = FormatName.declare("iq4_nl")
IQ4_NL_VALUES = (-127.0, -104.0, -83.0, -65.0, -49.0, -35.0, -22.0, -10.0,
                 1.0, 13.0, 25.0, 38.0, 53.0, 69.0, 89.0, 113.0)  # ggml-common.h kvalues_iq4nl


@register_format(IQ4_NL)
def _iq4_nl(bits: int, symmetric: bool) -> LookupFormat:
    if bits != 4:
        raise ValueError(f"iq4_nl is a 4-bit format, got bits={bits}; use --bits 4")
    if not symmetric:
        raise ValueError("iq4_nl is a fixed table and has no zero-point; use --sym (asymmetric is int only)")
    return LookupFormat(IQ4_NL, IQ4_NL_VALUES)

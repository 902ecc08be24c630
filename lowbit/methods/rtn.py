"""Round-to-nearest: choose each row's range with an observer, then round every weight on its own.

The baseline every other method must beat. No calibration data; cost is one pass over the weight
(plus the observer's search for ``mse`` and ``kl``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowbit.methods.registry import register_method
from lowbit.observers import observe_range
from lowbit.quantizer import fake_quantizer, qparams, quantize_rows, rows_shape, weight_rows
from lowbit.qweight import QuantizedWeight
from lowbit.scheme import QuantScheme


def check_finite(weight: Tensor, layer: str) -> None:
    """Refuse NaN/Inf weights with a message that names the layer and the likely cause."""
    bad = (~torch.isfinite(weight)).sum().item()
    if bad:
        raise ValueError(
            f"{layer} has {bad} NaN/Inf values; the checkpoint is corrupt or overflowed "
            "(load it in float32 and check the source model)"
        )


@register_method("rtn")
@torch.no_grad()
def quantize_rtn(weight: Tensor, scheme: QuantScheme, *, layer: str = "weight") -> QuantizedWeight:
    """Quantize ``weight [out, in]`` by rounding to the nearest grid point of each row's range."""
    check_finite(weight, layer)
    fmt = scheme.number_format()
    rows = weight_rows(weight, scheme, layer)
    lo, hi = observe_range(rows, scheme.observer, symmetric=scheme.symmetric,
                           fake_quant=fake_quantizer(fmt, scheme), levels=2**scheme.bits)
    scale, zero = qparams(lo, hi, fmt, scheme)
    codes = quantize_rows(rows, scale, zero, fmt, scheme).reshape(weight.shape)
    R, G = rows_shape(tuple(weight.shape), scheme, layer)
    return QuantizedWeight.from_codes(codes, scale.reshape(R, G), None if zero is None else zero.reshape(R, G), scheme)

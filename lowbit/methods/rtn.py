"""Round-to-nearest: choose each row's range with an observer, then round every weight on its own.

The baseline every other method must beat. No calibration data; cost is one pass over the weight
(plus the observer's search for ``mse`` and ``kl``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lowbit.methods.registry import InputStatistics, per_weight, register_method
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


def rtn_params(weight: Tensor, scheme: QuantScheme, layer: str = "weight") -> tuple[Tensor, Tensor, Tensor | None]:
    """``(rows, scale, zero)``: the weight as rows and their observer-chosen parameters.

    The starting point of every data-free method; raises on NaN/Inf weights or a bad group size.
    """
    check_finite(weight, layer)
    rows = weight_rows(weight, scheme, layer)
    return (rows, *row_params(rows, scheme))


def row_params(rows: Tensor, scheme: QuantScheme) -> tuple[Tensor, Tensor | None]:
    """Scale and zero (None when symmetric) per row of ``rows [r, n]``, the range chosen by the
    scheme's observer: what RTN uses, and what GPTQ and AWQ start from."""
    fmt = scheme.number_format()
    lo, hi = observe_range(rows, scheme.observer, symmetric=scheme.symmetric,
                           fake_quant=fake_quantizer(fmt, scheme), levels=2**scheme.bits)
    return qparams(lo, hi, fmt, scheme)


def weight_from_rows(rows: Tensor, scale: Tensor, zero: Tensor | None, scheme: QuantScheme,
                     shape: tuple[int, int]) -> QuantizedWeight:
    """Round ``rows`` with their final ``scale``/``zero`` and pack them as a weight of ``shape``."""
    codes = quantize_rows(rows, scale, zero, scheme.number_format(), scheme).reshape(shape)
    R, G = rows_shape(shape, scheme)
    return QuantizedWeight.from_codes(codes, scale.reshape(R, G), None if zero is None else zero.reshape(R, G), scheme)


@torch.no_grad()
def quantize_rtn(weight: Tensor, scheme: QuantScheme, *, layer: str = "weight") -> QuantizedWeight:
    """Quantize ``weight [out, in]`` by rounding to the nearest grid point of each row's range."""
    rows, scale, zero = rtn_params(weight, scheme, layer)
    return weight_from_rows(rows, scale, zero, scheme, tuple(weight.shape))


@dataclass(frozen=True)
class RTNConfig:
    """RTN has no knobs: the scheme's observer chooses each row's range."""


@register_method("rtn", config=RTNConfig, summary="round to nearest, range by the scheme's observer (data-free)")
@per_weight
def _solve_rtn(weight: Tensor, scheme: QuantScheme, config: RTNConfig, statistics: InputStatistics,
               layer: str) -> QuantizedWeight:
    return quantize_rtn(weight, scheme, layer=layer)

"""A toy calibrated method, added in this one file: RTN whose per-row range is shrunk by the factor
(from ``config.ratios``) that minimises the layer's output error ``tr(dW H dW^T)`` on calibration data.

All lowbit needs from a method is here: a frozen config dataclass, the statistics it reads (the
Hessian, so the pipeline collects it block by block) and a ``solve`` registered under a name.
"""

from dataclasses import dataclass

import torch

from lowbit.methods import Statistic, register_method
from lowbit.methods.registry import per_weight
from lowbit.methods.rtn import rtn_params, weight_from_rows


@dataclass(frozen=True)
class ShrinkConfig:
    ratios: tuple[float, ...] = (1.0, 0.95, 0.9, 0.85, 0.8)

    def __post_init__(self) -> None:
        if not self.ratios or not all(0 < r <= 1 for r in self.ratios):
            raise ValueError(f"ratios must be in (0, 1], got {self.ratios!r}")


@register_method("toy-shrink", config=ShrinkConfig, statistics=[Statistic.HESSIAN],
                 summary="RTN with the range shrink of least output error (a toy for the docs)")
@per_weight
def solve_shrink(weight, scheme, config, statistics, layer):
    rows, scale, zero = rtn_params(weight, scheme, layer)
    H = statistics["hessian"]
    best, best_error = None, float("inf")
    for ratio in config.ratios:
        qw = weight_from_rows(rows, scale * ratio, None if zero is None else zero, scheme, tuple(weight.shape))
        delta = qw.dequantize() - weight.float()
        error = torch.einsum("oi,ij,oj->", delta, H, delta).item()
        if error < best_error:
            best, best_error = qw, error
    return best

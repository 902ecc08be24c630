"""SmoothQuant: move activation outliers into the weights before W8A8 quantization.

Xiao, Lin, Seznec, Wu, Demouth, Han, "SmoothQuant: Accurate and Efficient Post-Training
Quantization for Large Language Models" (ICML 2023). A few input channels of a linear carry
activations 10-100x larger than the rest, so one per-tensor int8 scale wastes almost all its levels
on them. Dividing channel ``j`` of the input by ``s_j`` and multiplying the weight's column ``j`` by
it leaves the product unchanged and evens out the activations; with

    s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha)

(``max|W_:,j|`` over every linear reading that input), ``alpha`` balances the difficulty between
activations and weights (0.5 in the paper for most models). ``1/s`` is folded into the op that
produces the input (``lowbit.nn.fold``), so the float model computes the same function.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lowbit.methods.registry import InputStatistics, Statistic
from lowbit.methods.transforms import ChannelScales, TransformKind, register_transform
from lowbit.scheme import QuantScheme


@dataclass(frozen=True)
class SmoothQuantConfig:
    """``alpha``: migration strength in [0, 1] (0: no change of the activations, 1: all of the
    range moves into the weights)."""

    alpha: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"SmoothQuant alpha must be in [0, 1], got {self.alpha!r}; the paper uses 0.5")


def smoothing_scales(act_absmax: Tensor, weights: Sequence[Tensor], alpha: float) -> Tensor:
    """Per-input-channel ``s`` for an input with channel maxima ``act_absmax [in]`` read by ``weights``
    (each ``[out, in]``). Channels that never saw a non-zero activation (or whose weight columns are
    all zero) keep ``s = 1``: there is nothing to migrate."""
    w_absmax = torch.stack([w.detach().float().abs().amax(dim=0) for w in weights]).amax(dim=0)
    x = act_absmax.float()
    dead = (x <= 0) | (w_absmax <= 0)
    s = x.clamp(min=1e-12).pow(alpha) / w_absmax.clamp(min=1e-12).pow(1.0 - alpha)
    return torch.where(dead, torch.ones_like(s), s.clamp(min=1e-5))


@register_transform("smoothquant", config=SmoothQuantConfig, kind=TransformKind.CHANNEL_SCALING,
                    statistics=[Statistic.INPUT_MAGNITUDES],
                    summary="SmoothQuant: activation outliers moved into the weights (for --acts)")
def _smoothing(weights: Sequence[Tensor], scheme: QuantScheme, config: SmoothQuantConfig,
               statistics: InputStatistics) -> ChannelScales:
    return ChannelScales(smoothing_scales(statistics["absmax"], weights, config.alpha))

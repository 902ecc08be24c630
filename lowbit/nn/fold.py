"""Fold a per-input-channel scale into a model without changing what it computes.

AWQ (and SmoothQuant) multiply the input channels of some linears by ``s`` and divide the output
channels of the op that feeds them by the same ``s``: ``W x = (W diag(s)) (diag(s)^-1 x)``. The
float model is unchanged; the scaled weights quantize better because the channels that matter
most got larger. The feeding op can be a norm (its weight, and bias for LayerNorm) or a linear
whose outputs reach the consumers only through operations that commute with a positive
per-channel scale (attention's value path, ``act(gate) * up``, ReLU).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D


@torch.no_grad()
def fold_input_scale(prev: nn.Module, consumers: list[nn.Module], scale: Tensor, *,
                     norm_weight_offset: float = 0.0) -> None:
    """Divide ``prev``'s outputs by ``scale`` and multiply the consumers' input columns by it, in place.

    Args:
        prev: the op whose output the consumers read: ``nn.Linear``/``Conv1D`` (output rows and bias
            scaled), or a norm with a 1-D ``weight`` (and optional ``bias``) over the channels.
        consumers: ``nn.Linear``/``Conv1D`` layers reading ``prev``'s output.
        scale: positive float ``[channels]``.
        norm_weight_offset: the norm multiplies by ``offset + weight`` (Gemma's RMSNorm uses
            ``1 + weight``); the stored weight becomes ``(offset + weight) / s - offset``.

    Raises:
        ValueError: a non-positive or non-finite scale, a size that does not match, or a ``prev``
            of a kind that cannot absorb a scale.
    """
    scale = scale.detach().float()
    if scale.dim() != 1 or not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
        raise ValueError("a folded scale must be a 1-D tensor of finite positive values")
    channels = scale.numel()
    for consumer in consumers:
        if _in_features(consumer) != channels:
            raise ValueError(f"{type(consumer).__name__} reads {_in_features(consumer)} channels, scale has {channels}")
    if isinstance(prev, (nn.Linear, Conv1D)):
        weight = prev.weight.data.T if isinstance(prev, Conv1D) else prev.weight.data  # [out, in] view
        if weight.shape[0] != channels:
            raise ValueError(f"{type(prev).__name__} has {weight.shape[0]} outputs, scale has {channels}")
        weight.div_(scale.to(weight.dtype)[:, None])
        if prev.bias is not None:
            prev.bias.data.div_(scale.to(prev.bias.dtype))
    else:
        norm_weight = getattr(prev, "weight", None)
        if not isinstance(norm_weight, Tensor) or norm_weight.dim() != 1 or norm_weight.numel() != channels:
            raise ValueError(f"cannot fold a scale into {type(prev).__name__}: expected a linear or a norm with a "
                             f"1-D weight of {channels} channels")
        w = norm_weight.data
        w.copy_(((w.float() + norm_weight_offset) / scale - norm_weight_offset).to(w.dtype))
        bias = getattr(prev, "bias", None)
        if isinstance(bias, Tensor):
            bias.data.div_(scale.to(bias.dtype))
    for consumer in consumers:
        weight = consumer.weight.data.T if isinstance(consumer, Conv1D) else consumer.weight.data
        weight.mul_(scale.to(weight.dtype)[None, :])


def _in_features(linear: nn.Module) -> int:
    if isinstance(linear, Conv1D):
        return linear.weight.shape[0]
    if isinstance(linear, nn.Linear):
        return linear.in_features
    raise ValueError(f"consumers of a folded scale must be linear layers, got {type(linear).__name__}")

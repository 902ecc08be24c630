"""A quantized model seen as a float one for a while: what exporters that re-encode weights read."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from lowbit.nn.qlinear import QuantLinear
from lowbit.nn.replace import quantized_layers, set_submodule
from lowbit.qweight import QuantizedWeight


@contextmanager
def float_view(model: nn.Module) -> Iterator[dict[str, QuantizedWeight]]:
    """Swap each ``QuantLinear`` for an ``nn.Linear`` holding its dequantized float32 weight while the
    block runs; yields parameter name (``"model.layers.0.mlp.up_proj.weight"``) -> ``QuantizedWeight``,
    so a writer can still copy the codes of a layer whose scheme its format stores exactly.

    Code that names, plans or converts parameters then sees one kind of model. The quantized layers
    are put back afterwards, also when the block raises.
    """
    swapped: dict[str, QuantLinear] = quantized_layers(model)
    codes = {}
    for name, layer in swapped.items():
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        qweight = layer.quantized_weight()
        linear.weight = nn.Parameter(qweight.dequantize(torch.float32), requires_grad=False)
        if layer.bias is not None:
            linear.bias = layer.bias
        set_submodule(model, name, linear)
        codes[name + ".weight"] = qweight
    try:
        yield codes
    finally:
        for name, layer in swapped.items():
            set_submodule(model, name, layer)

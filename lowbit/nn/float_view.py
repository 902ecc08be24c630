"""A quantized model seen as a float one for a while: what exporters that re-encode weights read."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from lowbit.nn.qembedding import QuantEmbedding
from lowbit.nn.qlinear import QuantLinear
from lowbit.nn.replace import quantized_layers, set_submodule
from lowbit.qweight import QuantizedWeight


@contextmanager
def float_view(model: nn.Module) -> Iterator[dict[str, QuantizedWeight]]:
    """Swap each ``QuantLinear`` for an ``nn.Linear`` holding its dequantized float32 weight while the
    block runs; yields parameter name (``"model.layers.0.mlp.up_proj.weight"``) -> ``QuantizedWeight``,
    so a writer can still copy the codes of a layer whose scheme its format stores exactly.

    Code that names, plans or converts parameters then sees one kind of model. A ``QuantEmbedding``
    becomes an ``nn.Embedding`` whose weight is the float head's own parameter, so the view is tied
    as the float model was. The quantized modules are put back afterwards, also when the block raises.
    """
    swapped: dict[str, QuantLinear] = quantized_layers(model)
    embeddings = {n: m for n, m in model.named_modules() if isinstance(m, QuantEmbedding)}
    floats: dict[int, tuple[str, nn.Linear]] = {}
    codes = {}
    for name, layer in swapped.items():
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        qweight = layer.quantized_weight()
        linear.weight = nn.Parameter(qweight.dequantize(torch.float32), requires_grad=False)
        if layer.bias is not None:
            linear.bias = layer.bias
        set_submodule(model, name, linear)
        codes[name + ".weight"] = qweight
        floats[id(layer)] = name, linear
    for name, embedding in embeddings.items():
        head_name, head = floats[id(embedding.head)]
        set_submodule(model, name, _TiedEmbedding(head.weight, embedding.embed_scale, embedding.padding_idx))
        codes[name + ".weight"] = codes[head_name + ".weight"]  # named either way, the tied tensor has one set of codes
    try:
        yield codes
    finally:
        for name, layer in {**swapped, **embeddings}.items():
            set_submodule(model, name, layer)


class _TiedEmbedding(nn.Embedding):
    """An embedding whose weight is another module's parameter (the same object), times ``embed_scale``
    as Gemma's scaled embedding does."""

    def __init__(self, weight: nn.Parameter, embed_scale: float, padding_idx: int | None) -> None:
        super().__init__(weight.shape[0], weight.shape[1], padding_idx, device="meta")
        self.weight = weight
        self.embed_scale = embed_scale

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = super().forward(ids)
        return out * self.embed_scale if self.embed_scale != 1.0 else out

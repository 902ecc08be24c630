"""A quantized layer as plain data and back: the one description checkpoints and loaders share.

``LayerRecord`` declares everything a quantized layer is besides its weight tensors (which
``lowbit.qweight.FIELDS`` declares): its shape and scheme, the entry count of a sparse part, and the
activation side (a W8A8 activation scheme whose static form stores an ``input_scale``, the LLM.int8
outlier threshold, an online Hadamard rotation of the input). ``LayerRecord.of(module)`` is the one
place that reads those from a module and ``build`` the one place that makes a module from them;
``quantization_config["layers"][name]`` is ``to_entry()``. ``lowbit.load_quantized`` and the
transformers quantizer both go through here, so a checkpoint means the same thing to each.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from lowbit.act_scheme import ActScheme
from lowbit.nn.act_linear import ActQuantLinear
from lowbit.nn.input_hadamard import add_input_hadamard, has_input_hadamard
from lowbit.nn.int8_linear import Int8OutlierLinear
from lowbit.nn.qembedding import QuantEmbedding
from lowbit.nn.qlinear import QuantLinear
from lowbit.nn.replace import quantized_layers, set_submodule
from lowbit.qweight import WeightLayout
from lowbit.scheme import QuantScheme


@dataclass(frozen=True)
class TiedEmbedding:
    """The input embedding that reads a quantized LM head's codes (``QuantEmbedding``)."""

    name: str
    embed_scale: float = 1.0
    padding_idx: int | None = None


@dataclass(frozen=True)
class LayerRecord:
    """What a checkpoint records for one quantized linear layer.

    Fields:
        layout: scheme, ``(out, in)`` shape and sparse entry count of the weight.
        act: W8A8 activation scheme, or None for weight-only layers.
        int8_threshold: LLM.int8's outlier threshold (then ``act`` is its dynamic int8 per-token scheme).
        input_hadamard: the layer rotates its input online (``lowbit.nn.input_hadamard``).
        tied_embedding: the model's input embedding reads this layer's codes (a tied LM head).
    """

    layout: WeightLayout
    act: ActScheme | None = None
    int8_threshold: float | None = None
    input_hadamard: bool = False
    tied_embedding: TiedEmbedding | None = None

    @classmethod
    def of(cls, module: QuantLinear) -> LayerRecord:
        threshold = module.threshold if isinstance(module, Int8OutlierLinear) else None
        act = module.act if isinstance(module, ActQuantLinear) and threshold is None else None
        return cls(module.layout, act, threshold, has_input_hadamard(module))

    def input_tensors(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """The activation side's stored tensors by name (a static W8A8 layer's ``input_scale``)."""
        return {"input_scale": ((), torch.float32)} if self.act is not None and not self.act.dynamic else {}

    def to_entry(self) -> dict[str, Any]:
        """The record as ``quantization_config["layers"][name]`` stores it (JSON)."""
        entry: dict[str, Any] = {"shape": list(self.layout.shape), "scheme": self.layout.scheme.to_dict()}
        if self.layout.outliers:
            entry["outliers"] = self.layout.outliers
        if self.int8_threshold is not None:
            entry["int8_threshold"] = self.int8_threshold
        elif self.act is not None:
            entry["act"] = self.act.to_dict()
        if self.input_hadamard:
            entry["input_hadamard"] = True
        if self.tied_embedding is not None:
            entry["tied_embedding"] = vars(self.tied_embedding).copy()
        return entry

    @classmethod
    def from_entry(cls, entry: dict[str, Any]) -> LayerRecord:
        out_features, in_features = entry["shape"]
        if not (isinstance(out_features, int) and isinstance(in_features, int) and out_features > 0 and in_features > 0):
            raise ValueError(f"shape {entry['shape']} is not two positive integers")
        layout = WeightLayout(QuantScheme.from_dict(entry["scheme"]), (out_features, in_features),
                              entry.get("outliers", 0))
        act = ActScheme.from_dict(entry["act"]) if entry.get("act") is not None else None
        tied = TiedEmbedding(**entry["tied_embedding"]) if entry.get("tied_embedding") else None
        return cls(layout, act, entry.get("int8_threshold"), bool(entry.get("input_hadamard")), tied)

    def build(self, name: str, bias: bool, bias_dtype: torch.dtype = torch.float32) -> QuantLinear:
        """An empty module of this kind (its buffers are then loaded from the weights file)."""
        out_features, in_features = self.layout.shape
        if self.int8_threshold is not None:
            module = Int8OutlierLinear(in_features, out_features, self.int8_threshold, bias, bias_dtype, layer=name)
        elif self.act is not None:
            module = ActQuantLinear(in_features, out_features, self.layout.scheme, self.act, bias, bias_dtype,
                                    layer=name)
        else:
            module = QuantLinear(in_features, out_features, self.layout.scheme, bias, bias_dtype,
                                 self.layout.outliers)
        if self.input_hadamard:
            add_input_hadamard(module)
        return module


def layer_records(model: nn.Module) -> dict[str, LayerRecord]:
    """The record of every quantized layer of ``model`` by name (a tied LM head names its embedding)."""
    embeddings = {id(m.head): (n, m) for n, m in model.named_modules() if isinstance(m, QuantEmbedding)}
    records = {}
    for name, module in quantized_layers(model).items():
        record = LayerRecord.of(module)
        if id(module) in embeddings:
            emb_name, emb = embeddings[id(module)]
            record = replace(record, tied_embedding=TiedEmbedding(emb_name, emb.embed_scale, emb.padding_idx))
        records[name] = record
    return records


def install_layer(model: nn.Module, name: str, record: LayerRecord, bias: bool,
                  bias_dtype: torch.dtype = torch.float32) -> QuantLinear:
    """Put an empty module of ``record``'s kind at ``name`` (and its tied embedding, if any); returns it."""
    module = record.build(name, bias, bias_dtype)
    set_submodule(model, name, module)
    tied = record.tied_embedding
    if tied is not None:
        set_submodule(model, tied.name, QuantEmbedding(module, tied.embed_scale, tied.padding_idx))
    return module

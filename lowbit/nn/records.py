"""A quantized layer as plain data and back: the one description checkpoints and loaders share.

``layer_entry`` is what ``quantization_config["layers"][name]`` records for a module;
``module_from_entry`` builds the empty module of that kind (its buffers are then loaded from the
weights file). ``lowbit.load_quantized`` and the transformers quantizer both go through here, so a
checkpoint means the same thing to each.
"""

from __future__ import annotations

from typing import Any

import torch

from lowbit.act_scheme import ActScheme
from lowbit.nn.act_linear import ActQuantLinear
from lowbit.nn.input_hadamard import add_input_hadamard, has_input_hadamard
from lowbit.nn.int8_linear import Int8OutlierLinear
from lowbit.nn.qlinear import QuantLinear
from lowbit.scheme import QuantScheme


def layer_entry(module: QuantLinear) -> dict[str, Any]:
    """A quantized layer's record: shape, weight scheme, its activation scheme or outlier threshold,
    and whether it rotates its input (``input_hadamard``)."""
    entry: dict[str, Any] = {"shape": [module.out_features, module.in_features], "scheme": module.scheme.to_dict()}
    if isinstance(module, Int8OutlierLinear):
        entry["int8_threshold"] = module.threshold
    elif isinstance(module, ActQuantLinear):
        entry["act"] = module.act.to_dict()
    if has_input_hadamard(module):
        entry["input_hadamard"] = True
    return entry


def module_from_entry(name: str, entry: dict[str, Any], bias: bool,
                      bias_dtype: torch.dtype = torch.float32) -> QuantLinear:
    """An empty module of the kind ``entry`` records (see ``layer_entry``)."""
    out_features, in_features = entry["shape"]
    scheme = QuantScheme.from_dict(entry["scheme"])
    if "int8_threshold" in entry:
        module = Int8OutlierLinear(in_features, out_features, entry["int8_threshold"], bias, bias_dtype, layer=name)
    elif entry.get("act") is not None:
        module = ActQuantLinear(in_features, out_features, scheme, ActScheme.from_dict(entry["act"]), bias,
                                bias_dtype, layer=name)
    else:
        module = QuantLinear(in_features, out_features, scheme, bias, bias_dtype)
    if entry.get("input_hadamard"):
        add_input_hadamard(module)
    return module

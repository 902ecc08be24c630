"""Quantized modules and the helpers that put them into a model."""

from lowbit.nn.fold import fold_input_scale
from lowbit.nn.qlinear import QuantLinear
from lowbit.nn.replace import quantized_layers, set_submodule

__all__ = ["QuantLinear", "fold_input_scale", "quantized_layers", "set_submodule"]

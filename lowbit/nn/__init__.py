"""Quantized modules and the helpers that put them into a model."""

from lowbit.nn.qlinear import QuantLinear
from lowbit.nn.replace import quantized_layers, set_submodule

__all__ = ["QuantLinear", "quantized_layers", "set_submodule"]

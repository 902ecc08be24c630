"""Quantized modules and the helpers that put them into a model."""

from lowbit.nn.fold import fold_input_scale
from lowbit.nn.qembedding import QuantEmbedding, tie_quantized_embedding
from lowbit.nn.qlinear import QuantLinear
from lowbit.nn.kernels import KERNELS, Kernel, register_kernel, select_kernel
from lowbit.nn.replace import linear_schemes, move_model, prepare_kernels, quantized_layers, set_submodule

__all__ = ["KERNELS", "Kernel", "QuantEmbedding", "QuantLinear", "fold_input_scale", "linear_schemes", "move_model",
           "prepare_kernels", "quantized_layers", "register_kernel", "select_kernel", "set_submodule",
           "tie_quantized_embedding"]

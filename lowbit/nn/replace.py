"""Finding and swapping linear layers inside a model."""

from __future__ import annotations

from torch import nn

from lowbit.nn.input_hadamard import add_input_hadamard, has_input_hadamard
from lowbit.nn.qlinear import QuantLinear


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at dotted path ``name`` of ``model``, replacing what was there.

    A replaced layer's online input rotation (``lowbit.nn.input_hadamard``) moves to ``module``:
    its weight was rotated for that input, so the rotation is part of the function it computes.
    """
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if has_input_hadamard(getattr(parent, child, None)):
        add_input_hadamard(module)
    setattr(parent, child, module)


def quantized_layers(model: nn.Module) -> dict[str, QuantLinear]:
    """Every ``QuantLinear`` in ``model`` by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}

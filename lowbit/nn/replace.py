"""Finding and swapping linear layers inside a model."""

from __future__ import annotations

from torch import nn

from lowbit.nn.qlinear import QuantLinear


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at dotted path ``name`` of ``model``, replacing what was there."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def quantized_layers(model: nn.Module) -> dict[str, QuantLinear]:
    """Every ``QuantLinear`` in ``model`` by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}

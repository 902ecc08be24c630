"""An online Hadamard rotation of a linear layer's input, kept across quantization and checkpoints.

``x W^T = hadamard(x) (W H)^T``: after ``lowbit.methods.rotation`` multiplies a layer's weight by
``H``, the layer must rotate its input on every forward. That is a forward pre-hook, registered
first, so every other hook on the layer (Hessian capture, activation histograms) sees the rotated
input the weight was rotated for. ``set_submodule`` carries the rotation to a replacement layer
(a ``QuantLinear`` computes the same function only with it), and a checkpoint records it per layer.
"""

from __future__ import annotations

from torch import Tensor, nn

from lowbit.hadamard import hadamard_transform


def _rotate_input(module: nn.Module, args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return (hadamard_transform(args[0]), *args[1:])


def add_input_hadamard(module: nn.Module) -> None:
    """Make ``module`` rotate its input by the Hadamard matrix of its input size (idempotent)."""
    if has_input_hadamard(module):
        return
    module.input_hadamard = True
    module.register_forward_pre_hook(_rotate_input, prepend=True)


def has_input_hadamard(module: nn.Module) -> bool:
    """Whether ``module`` rotates its input (``add_input_hadamard``)."""
    return bool(getattr(module, "input_hadamard", False))

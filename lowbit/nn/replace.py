"""Finding and swapping linear layers inside a model."""

from __future__ import annotations

import dataclasses
import warnings

import torch
from torch import nn

from lowbit import kernels as compiled_kernels
from lowbit.kernels.huge_pages import in_huge_pages
from lowbit.nn.input_hadamard import add_input_hadamard, has_input_hadamard
from lowbit.nn.kernels import ACTIVATIONS, REFERENCE, select_kernel
from lowbit.nn.qlinear import QuantLinear
from lowbit.scheme import QuantScheme


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


def linear_schemes(model: nn.Module) -> dict[str, QuantScheme | None]:
    """Every linear layer of ``model`` by name: its ``QuantScheme``, or None for a float ``nn.Linear``."""
    return {n: m.scheme if isinstance(m, QuantLinear) else None for n, m in model.named_modules()
            if isinstance(m, (QuantLinear, nn.Linear))}


def prepare_kernels(model: nn.Module, activations: str = "auto") -> dict[str, list[str]]:
    """Lay out every quantized layer's weight for the kernel its scheme and device get (the explicit
    step ``QuantLinear.prepare_kernel`` describes), with the activation precision ``activations`` of
    products of few rows (``lowbit.nn.kernels.ACTIVATIONS``; "auto": int16 where the kernel can, else
    float32). Layers left on the reference path are named in one warning, with the reason the first
    kernel of the table gave, as are layers that cannot give an explicitly asked int8 or int16.
    The CPU layouts of all layers then move into one huge-page mapping (``lowbit.kernels.huge_pages``).
    Returns kernel name (``QuantLinear.kernel_name``, e.g. ``lowbit-cpu/int16``) -> layers.

    Raises:
        ValueError: an unknown ``activations``.
    """
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {', '.join(ACTIVATIONS)}, got {activations!r}")
    chosen: dict[str, list[str]] = {}
    prepared: list[QuantLinear] = []
    for name, module in quantized_layers(model).items():
        if type(module).forward is not QuantLinear.forward:
            continue  # W8A8 and LLM.int8 layers run their own 8-bit products
        chosen.setdefault(module.prepare_kernel(activations), []).append(name)
        prepared.append(module)
    _layouts_in_huge_pages(prepared)
    fallback = chosen.get(REFERENCE.name, [])
    if fallback:
        module = model.get_submodule(fallback[0])
        _, reasons = select_kernel(module.scheme, module.qdata.device)
        why = "; ".join(f"{k}: {r}" for k, r in reasons.items()) or "no kernel registered"
        warnings.warn(f"{len(fallback)} quantized layers run the reference path (dequantize + matmul), e.g. "
                      f"{fallback[0]} ({module.scheme.describe()}: {why})", stacklevel=2)
    if activations not in ("auto", "float32"):
        exact = {name: module for name, module in quantized_layers(model).items()
                 if getattr(module, "prepared", None) is not None and module.prepared.activations == "float32"}
        if exact:
            name, module = next(iter(exact.items()))
            kernel = module.prepared.kernel
            why = (f"the {kernel.name} kernel computes with float32 activations only" if kernel.prepare_rounded is None
                   else compiled_kernels.int8_activations_reason(module.scheme) or "its width is not a multiple of 64")
            warnings.warn(f"{len(exact)} quantized layers keep float32 activations instead of {activations}, e.g. "
                          f"{name} ({module.scheme.describe()}: {why})", stacklevel=2)
    return chosen


def move_model(model: nn.Module, device: torch.device | str) -> None:
    """``model.to(device)`` in place, each quantized layer that had a kernel layout laid out again for
    the kernel it gets there, with the activation precision it had (a layout serves one device:
    ``QuantLinear.forward`` refuses an input from another). On CUDA every layer gets the reference
    path: the compiled kernels are CPU only."""
    before = {n: m.prepared.activations for n, m in quantized_layers(model).items() if m.prepared is not None}
    model.to(device)
    for name, activations in before.items():
        model.get_submodule(name).prepare_kernel(activations)


def _layouts_in_huge_pages(modules: list[QuantLinear]) -> None:
    """Move the CPU layouts of ``modules`` into one huge-page mapping (``lowbit.kernels.huge_pages``):
    a decode step streams them all, and small layers share pages that way."""
    movable = [m for m in modules if m.prepared is not None and m.prepared.device.type == "cpu"
               and dataclasses.is_dataclass(m.prepared.layout)]
    for module, layout in zip(movable, in_huge_pages([m.prepared.layout for m in movable])):
        module.prepared = dataclasses.replace(module.prepared, layout=layout)

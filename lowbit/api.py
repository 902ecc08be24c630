"""The library's front door: load a model from anywhere, quantize it in place, save it."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.io.checkpoint import is_lowbit_checkpoint, load_quantized
from lowbit.methods import get_method
from lowbit.methods.awq import AWQConfig
from lowbit.methods.gptq import GPTQConfig
from lowbit.nn import QuantLinear, set_submodule
from lowbit.pipeline.recipe import Recipe
from lowbit.pipeline.sequential import MethodPlan, SequentialReport, quantize_sequential
from lowbit.scheme import QuantScheme
from lowbit.sources import load_model


@dataclass
class QuantizeReport:
    """What ``quantize`` did: the scheme of every quantized layer and what it kept in float."""

    layers: dict[str, QuantScheme] = field(default_factory=dict)
    kept_float: list[str] = field(default_factory=list)
    seconds: float = 0.0


def needs_calibration(method: str) -> bool:
    """Whether ``method`` (``gptq``, ``awq``, ``awq+gptq`` ...) needs calibration windows; such methods
    run block by block through ``quantize_sequential``. Raises ``ValueError`` on an unknown method."""
    return MethodPlan.parse(method).needs_statistics


@torch.no_grad()
def quantize(model: nn.Module, recipe: Recipe, *, calibration: torch.Tensor | None = None,
             gptq: GPTQConfig | None = None, awq: AWQConfig | None = None, true_sequential: bool = False,
             progress: bool = True) -> QuantizeReport | SequentialReport:
    """Replace every ``nn.Linear`` the recipe selects by a ``QuantLinear``, in place.

    Data-free methods (``rtn``, ``hqq``) go layer by layer; calibrated methods (``gptq``, ``awq``,
    ``awq+gptq``) need ``calibration`` token windows
    (``lowbit.pipeline.calibration.calibration_windows``) and go block by block. The float weight of
    each layer is released as soon as its quantized replacement is in. Raises ``ValueError`` when the
    recipe selects no layer, a layer cannot take its scheme (group size without a
    ``group_fallback``, NaN weights) or a calibrated method gets no calibration data.
    """
    if needs_calibration(recipe.method):
        if calibration is None:
            raise ValueError(f"method {recipe.method!r} needs calibration data; pass --calib PATH "
                             "(default: WikiText-2 valid from ../shared/data)")
        return quantize_sequential(model, recipe, calibration, method=recipe.method, gptq=gptq or GPTQConfig(),
                                   awq=awq or AWQConfig(), true_sequential=true_sequential, progress=progress)
    method = get_method(recipe.method)
    report = QuantizeReport()
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    plan = []
    for name, linear in linears:  # fail before any work on a layer whose shape the scheme cannot take
        scheme, note = recipe.scheme_for_layer(name, linear.in_features)
        if note is not None:
            warnings.warn(note, stacklevel=2)
        plan.append((name, linear, scheme))
    report.kept_float = [n for n, _, s in plan if s is None]
    todo = [(n, m, s) for n, m, s in plan if s is not None]
    if not todo:
        raise ValueError(f"the recipe selects none of the model's {len(linears)} linear layers; check skip/overrides")
    start = time.perf_counter()
    for name, linear, scheme in tqdm(todo, desc=f"quantize ({recipe.method})", unit="layer", disable=not progress):
        qweight = method(linear.weight.data, scheme, layer=name)
        set_submodule(model, name, QuantLinear.from_quantized(qweight, linear.bias))
        report.layers[name] = scheme
    report.seconds = time.perf_counter() - start
    return report


def load(source: str | Path) -> tuple[nn.Module, Any]:
    """(model, tokenizer) from a lowbit checkpoint, a Hugging Face directory or hub id, a ``.gguf``
    file or a demo name (``smollm2-135m``, ``gemma3-270m``); float models load in float32."""
    if Path(source).is_dir() and is_lowbit_checkpoint(source):
        return load_quantized(source)
    return load_model(str(source))

"""The library's front door: load a model from anywhere, quantize it in place, save it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.io.checkpoint import is_lowbit_checkpoint, load_quantized
from lowbit.pipeline.activations import quantize_activations
from lowbit.pipeline.recipe import Recipe
from lowbit.pipeline.sequential import QuantizeReport, quantize_sequential, statistics_needed
from lowbit.sources import load_model


def needs_calibration(recipe: Recipe) -> bool:
    """Whether ``recipe`` needs calibration windows: its method or a transform declares statistics
    (``lowbit.methods.Statistic``), or its activations get static scales."""
    static_acts = recipe.activations is not None and not recipe.activations.dynamic
    return bool(statistics_needed(recipe)) or static_acts


@torch.no_grad()
def quantize(model: nn.Module, recipe: Recipe, *, calibration: torch.Tensor | None = None,
             true_sequential: bool = False, progress: bool = True) -> QuantizeReport:
    """Replace every linear the recipe selects (``nn.Linear``, GPT-2's ``Conv1D``) by a ``QuantLinear``,
    in place, with the recipe's method and transforms (their configs travel in the recipe).

    Data-free recipes (``rtn``, ``hqq``) go layer by layer; recipes whose method or transforms
    declare statistics (``gptq``, ``awq``, ``smoothquant`` ...) need ``calibration`` token windows
    (``lowbit.pipeline.calibration.calibration_windows``) and go block by block
    (``lowbit.pipeline.sequential``). The float weight of each layer is released as soon as its
    quantized replacement is in. With ``recipe.activations`` the quantized linears then become
    W8A8 ``ActQuantLinear`` layers (static scales calibrated on ``calibration``), and the report's
    ``activations`` says how. A rotation transform first rotates the float model (no float output
    changes). Raises ``ValueError`` when the recipe selects no layer, a model cannot take the
    rotation, a layer cannot take its scheme (group size without a ``group_fallback``, NaN
    weights, a weight scheme the 8-bit product cannot take) or a calibrated recipe or static
    activation scheme gets no calibration data.
    """
    if needs_calibration(recipe) and calibration is None:
        raise ValueError(f"method {recipe.describe_method()!r}"
                         f"{' with static activation scales' if recipe.activations else ''} "
                         "needs calibration data; pass --calib PATH (default: WikiText-2 valid from ../shared/data)")
    if recipe.activations is not None:  # refuse an impossible weight scheme before any work
        for where, scheme in [("default", recipe.default), *((o.pattern, o.scheme) for o in recipe.overrides)]:
            if scheme is not None:
                recipe.activations.check_weight_scheme(scheme, f"the recipe's scheme for {where!r}")
    report = quantize_sequential(model, recipe, calibration, true_sequential=true_sequential, progress=progress)
    if recipe.activations is not None:
        start = time.perf_counter()
        report.activations = quantize_activations(model, recipe.activations, calibration, progress=progress)
        report.seconds += time.perf_counter() - start
    return report


def load(source: str | Path) -> tuple[nn.Module, Any]:
    """(model, tokenizer) from a lowbit checkpoint, a Hugging Face directory or hub id, a ``.gguf``
    file or a demo name (``smollm2-135m``, ``gemma3-270m``); float models load in float32."""
    if Path(source).is_dir() and is_lowbit_checkpoint(source):
        return load_quantized(source)
    return load_model(str(source))

"""The library's front door: load a model from anywhere, quantize it in place, export it."""

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
from lowbit.io.export import ExportResult, Feature, Statistics, check_export, model_features
from lowbit.io.export.base import CalibrationStatistics
from lowbit.memory import page_out
from lowbit.methods import get_method
from lowbit.methods.awq import AWQConfig
from lowbit.methods.gptq import GPTQConfig
from lowbit.methods.rotation import rotate_model
from lowbit.methods.smoothquant import SmoothQuantConfig
from lowbit.nn import QuantLinear, set_submodule
from lowbit.pipeline.activations import ActivationReport, quantize_activations
from lowbit.pipeline.recipe import Recipe
from lowbit.pipeline.sequential import MethodPlan, SequentialReport, quantize_sequential
from lowbit.pipeline.statistics import InputMoments, stream_input_statistics
from lowbit.scheme import QuantScheme
from lowbit.sources import load_model


@dataclass
class QuantizeReport:
    """What ``quantize`` did: the scheme of every quantized layer and what it kept in float."""

    layers: dict[str, QuantScheme] = field(default_factory=dict)
    kept_float: list[str] = field(default_factory=list)
    seconds: float = 0.0
    activations: ActivationReport | None = None


def needs_calibration(recipe: Recipe) -> bool:
    """Whether ``recipe`` needs calibration windows: its method is calibrated (``gptq``, ``awq``,
    ``awq+gptq``, ``smoothquant`` ...; such methods run block by block through
    ``quantize_sequential``) or its activations get static scales. Raises ``ValueError`` on an
    unknown method."""
    static_acts = recipe.activations is not None and not recipe.activations.dynamic
    return MethodPlan.parse(recipe.method).needs_statistics or static_acts


@torch.no_grad()
def quantize(model: nn.Module, recipe: Recipe, *, calibration: torch.Tensor | None = None,
             gptq: GPTQConfig | None = None, awq: AWQConfig | None = None,
             smoothquant: SmoothQuantConfig | None = None, true_sequential: bool = False,
             progress: bool = True) -> QuantizeReport | SequentialReport:
    """Replace every ``nn.Linear`` the recipe selects by a ``QuantLinear``, in place.

    Data-free methods (``rtn``, ``hqq``) go layer by layer; calibrated methods (``gptq``, ``awq``,
    ``awq+gptq``) need ``calibration`` token windows
    (``lowbit.pipeline.calibration.calibration_windows``) and go block by block. The float weight of
    each layer is released as soon as its quantized replacement is in. With ``recipe.activations``
    the quantized linears then become W8A8 ``ActQuantLinear`` layers (static scales calibrated on
    ``calibration``), and the report's ``activations`` says how. With ``recipe.rotation`` the float
    model is first rotated (``lowbit.methods.rotation``; no float output changes). Raises
    ``ValueError`` when the recipe selects no layer, a model or method cannot take the rotation, a
    layer cannot take its scheme (group size without a ``group_fallback``, NaN weights, a weight
    scheme the 8-bit product cannot take) or a calibrated method or static activation scheme gets no
    calibration data.
    """
    if needs_calibration(recipe) and calibration is None:
        raise ValueError(f"method {recipe.method!r}{' with static activation scales' if recipe.activations else ''} "
                         "needs calibration data; pass --calib PATH (default: WikiText-2 valid from ../shared/data)")
    if recipe.activations is not None:  # refuse an impossible weight scheme before any work
        for where, scheme in [("default", recipe.default), *((o.pattern, o.scheme) for o in recipe.overrides)]:
            if scheme is not None:
                recipe.activations.check_weight_scheme(scheme, f"the recipe's scheme for {where!r}")
    plan = MethodPlan.parse(recipe.method)
    if recipe.rotation is not None:
        if plan.scales is not None:
            raise ValueError(f"--rotate does not compose with {recipe.method!r}: SmoothQuant and AWQ scale channels "
                             "of the unrotated basis; use --method rtn or gptq with --rotate")
        rotate_model(model)
    if plan.needs_statistics:
        report = quantize_sequential(model, recipe, calibration, method=recipe.method, gptq=gptq or GPTQConfig(),
                                     awq=awq or AWQConfig(), smoothquant=smoothquant or SmoothQuantConfig(),
                                     true_sequential=true_sequential, progress=progress)
    else:
        report = _quantize_data_free(model, recipe, progress)
    if recipe.activations is not None:
        start = time.perf_counter()
        report.activations = quantize_activations(model, recipe.activations, calibration, progress=progress)
        report.seconds += time.perf_counter() - start
    return report


def _quantize_data_free(model: nn.Module, recipe: Recipe, progress: bool) -> QuantizeReport:
    """Layer by layer with a registry method (``rtn``, ``hqq``)."""
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
        page_out([linear.weight])
        report.layers[name] = scheme
    report.seconds = time.perf_counter() - start
    return report


def load(source: str | Path) -> tuple[nn.Module, Any]:
    """(model, tokenizer) from a lowbit checkpoint, a Hugging Face directory or hub id, a ``.gguf``
    file or a demo name (``smollm2-135m``, ``gemma3-270m``); float models load in float32."""
    if Path(source).is_dir() and is_lowbit_checkpoint(source):
        return load_quantized(source)
    return load_model(str(source))


def recipe_features(recipe: Recipe) -> set[Feature]:
    """The exporter ``Feature``s a model quantized by ``recipe`` will have, known before quantizing,
    so an export the format cannot hold is refused before the slow work."""
    return {Feature.ONLINE_ROTATION} if recipe.rotation is not None else set()


@torch.no_grad()
def export(model: nn.Module, tokenizer: Any, path: str | Path, *, to: str, overwrite: bool = False,
           calibration: torch.Tensor | None = None, progress: bool = True, **options: Any) -> ExportResult:
    """Write ``model`` (float or quantized by lowbit; only read) with the exporter ``to`` of
    ``lowbit.io.export.EXPORTERS``, e.g. ``export(model, tok, "m.gguf", to="gguf", type="Q4_K_M")``.

    ``options`` are the exporter's own (``EXPORTERS[to].options``; for ``"lowbit"`` also the
    ``recipe`` and calibration ``provenance`` to record). When they ask for calibration statistics
    (GGUF's ``imatrix``, ``gptq``) those are collected over ``calibration`` token windows ``[n, L]``
    first.

    Raises:
        ValueError: unknown format or option value, a model the format cannot hold (one line saying
            why), statistics asked for without ``calibration``.
        FileExistsError: ``path`` exists and ``overwrite`` is False.
    """
    exporter = check_export(to, path, overwrite=overwrite, features=model_features(model), options=options)
    needed = exporter.statistics(options)
    statistics = None
    if needed is not Statistics.NONE:
        if calibration is None:
            raise ValueError(f"{to} export with these options needs calibration data ({needed.value}); "
                             "pass --calib PATH (default: WikiText-2 valid from ../shared/data)")
        chunks = stream_input_statistics(model, calibration, lambda m: isinstance(m, nn.Linear),
                                         new_record=lambda: InputMoments(hessian=needed is Statistics.HESSIAN),
                                         progress=progress)  # lazy: the exporter runs it on its float view
        statistics = CalibrationStatistics(chunks, calibration.numel())
    return exporter.write(model, tokenizer, Path(path), statistics=statistics, **options)

"""The library's front door: load a model from anywhere, quantize it in place, export it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.device import resolve_device
from lowbit.io.checkpoint import is_lowbit_checkpoint, load_quantized
from lowbit.io.prequantized import load_prequantized, prequantized_method
from lowbit.io.export import ExportResult, Feature, Statistics, check_export, model_features
from lowbit.io.export.base import CalibrationStatistics
from lowbit.io.export.gguf import holdout_every
from lowbit.nn import tie_quantized_embedding
from lowbit.pipeline.activations import quantize_activations
from lowbit.pipeline.block_store import BlockStore
from lowbit.pipeline.distributed import Slices
from lowbit.pipeline.recipe import Recipe
from lowbit.pipeline.sequential import QuantizeReport, quantize_sequential, statistics_needed
from lowbit.pipeline.statistics import InputMoments, SplitMoments, stream_input_statistics
from lowbit.sources import load_model


def needs_calibration(recipe: Recipe) -> bool:
    """Whether ``recipe`` needs calibration windows: its method or a transform declares statistics
    (``lowbit.methods.Statistic``), or its activations get static scales."""
    static_acts = recipe.activations is not None and not recipe.activations.dynamic
    return bool(statistics_needed(recipe)) or static_acts


@torch.no_grad()
def quantize(model: nn.Module, recipe: Recipe, *, calibration: torch.Tensor | None = None,
             true_sequential: bool = False, progress: bool = True, store: BlockStore | None = None,
             slices: Slices = Slices(), device: torch.device | str = "cpu") -> QuantizeReport:
    """Replace every linear the recipe selects (``nn.Linear``, GPT-2's ``Conv1D``) by a ``QuantLinear``,
    in place, with the recipe's method and transforms (their configs travel in the recipe).

    Data-free recipes (``rtn``, ``hqq``) go layer by layer; recipes whose method or transforms
    declare statistics (``gptq``, ``awq``, ``smoothquant`` ...) need ``calibration`` token windows
    (``lowbit.pipeline.calibration.calibration_windows``) and go block by block
    (``lowbit.pipeline.sequential``). The float weight of each layer is released as soon as its
    quantized replacement is in. With ``recipe.activations`` the quantized linears then become
    W8A8 ``ActQuantLinear`` layers (static scales calibrated on ``calibration``), and the report's
    ``activations`` says how. A rotation transform first rotates the float model (no float output
    changes). When the recipe quantizes an LM head that the model ties to its input embedding, the
    embedding becomes a ``QuantEmbedding`` reading the head's codes. With a ``store``
    (``lowbit.pipeline.block_store``) each finished block goes to disk and leaves the model, and a
    half-done job resumes; write the result with ``lowbit.pipeline.streamed_save.save_streamed``.
    ``slices`` fixes the order statistics are summed in and, under torchrun, this rank's share
    (``lowbit.pipeline.distributed``). ``device`` ("cpu", "cuda", "cuda:N", "auto"; ``lowbit.device``)
    is where each block (or, data-free, each weight) is quantized; the model and its quantized
    layers stay on the CPU, and static activation scales are calibrated on the CPU. Raises
    ``ValueError`` when the recipe selects no layer, a model cannot take the
    rotation, a layer cannot take its scheme (group size without a ``group_fallback``, NaN
    weights, a weight scheme the 8-bit product cannot take), a calibrated recipe or static
    activation scheme gets no calibration data, or ``device`` is not there.
    """
    device = resolve_device(device)
    if needs_calibration(recipe) and calibration is None:
        raise ValueError(f"method {recipe.describe_method()!r}"
                         f"{' with static activation scales' if recipe.activations else ''} "
                         "needs calibration data; pass --calib PATH (default: WikiText-2 valid from ../shared/data)")
    if recipe.activations is not None:  # refuse an impossible weight scheme before any work
        for where, scheme in [("default", recipe.default), *((o.pattern, o.scheme) for o in recipe.overrides)]:
            if scheme is not None:
                recipe.activations.check_weight_scheme(scheme, f"the recipe's scheme for {where!r}")
    if store is not None and recipe.activations is not None:
        raise ValueError("static activation scales are calibrated on the whole quantized model, which a job "
                         "streamed through a work directory does not hold; quantize activations without --work-dir")
    report = quantize_sequential(model, recipe, calibration, true_sequential=true_sequential, progress=progress,
                                 store=store, slices=slices, device=device)
    if recipe.activations is not None:
        start = time.perf_counter()
        report.activations = quantize_activations(model, recipe.activations, calibration, progress=progress)
        report.seconds += time.perf_counter() - start
    tie_quantized_embedding(model)  # a quantized LM head tied to the embedding stays tied: one copy of its codes
    return report


def load(source: str | Path, *, verify: bool = True, allow_pickle: bool = False,
         dequantize: bool = False) -> tuple[nn.Module, Any]:
    """(model, tokenizer) from a lowbit checkpoint, a Hugging Face directory or hub id, a ``.gguf``
    file or a demo name (``smollm2-135m``, ``gemma3-270m``); float models load in float32.

    A GPTQ, AWQ or compressed-tensors directory loads with its packed layers as lowbit quantized layers,
    codes as they are (``lowbit.io.prequantized``); so does a ``.gguf`` file, each weight matrix whose
    block type is a lowbit scheme (``lowbit.gguf.quantized_model``), unless ``dequantize`` asks for
    every weight in float32 (what ``quantize`` starts from).
    A lowbit checkpoint is checked against its manifest unless ``verify`` is False
    (``lowbit.io.checkpoint``); float weights are read from safetensors only unless
    ``allow_pickle`` (``lowbit.io.pickles``). Both refusals are ``ValueError``s of one line.
    """
    if Path(source).is_dir() and is_lowbit_checkpoint(source):
        return load_quantized(source, verify=verify)
    if Path(source).is_dir() and prequantized_method(source) is not None:
        return load_prequantized(source)
    if str(source).endswith(".gguf") and Path(source).is_file() and not dequantize:
        from lowbit.gguf.quantized_model import load_gguf_codes

        return load_gguf_codes(source)
    return load_model(str(source), allow_pickle=allow_pickle)


def recipe_features(recipe: Recipe) -> set[Feature]:
    """The exporter ``Feature``s a model quantized by ``recipe`` will have, known before quantizing,
    so an export the format cannot hold is refused before the slow work."""
    return {Feature.ONLINE_ROTATION} if recipe.rotation is not None else set()


@torch.no_grad()
def export(model: nn.Module, tokenizer: Any, path: str | Path, *, to: str, overwrite: bool = False,
           calibration: torch.Tensor | None = None, progress: bool = True, device: torch.device | str = "cpu",
           **options: Any) -> ExportResult:
    """Write ``model`` (float or quantized by lowbit; only read) with the exporter ``to`` of
    ``lowbit.io.export.EXPORTERS``, e.g. ``export(model, tok, "m.gguf", to="gguf", type="Q4_K_M")``.

    ``options`` are the exporter's own (``EXPORTERS[to].options``; for ``"lowbit"`` also the
    ``recipe`` and calibration ``provenance`` to record). When they ask for calibration statistics
    (GGUF's ``imatrix``, ``gptq``) those are collected over ``calibration`` token windows ``[n, L]``
    first, each decoder block on ``device`` (``lowbit.device``); the exporter itself runs on the CPU.

    Raises:
        ValueError: unknown format or option value, a model the format cannot hold (one line saying
            why), statistics asked for without ``calibration``.
        FileExistsError: ``path`` exists and ``overwrite`` is False, or it is not something lowbit
            wrote (``lowbit.io.output.written_by_lowbit``), which ``overwrite`` never replaces.
        OutputError: ``path`` cannot be written, or another process is writing it.
    """
    device = resolve_device(device)
    exporter = check_export(to, path, overwrite=overwrite, features=model_features(model), options=options)
    needed = exporter.statistics(options)
    statistics = None
    if needed is not Statistics.NONE:
        if calibration is None:
            raise ValueError(f"{to} export with these options needs calibration data ({needed.value}); "
                             "pass --calib PATH (default: WikiText-2 valid from ../shared/data)")
        every = holdout_every(options)  # GGUF's --holdout: fitting and held-out windows apart (SplitMoments)
        chunks = stream_input_statistics(model, calibration, lambda m: isinstance(m, nn.Linear),
                                         new_record=(lambda: SplitMoments(every)) if every else
                                         (lambda: InputMoments(hessian=needed is Statistics.HESSIAN)),
                                         progress=progress, device=device)  # lazy: run on the exporter's float view
        statistics = CalibrationStatistics(chunks, calibration.numel())
    return exporter.write(model, tokenizer, Path(path), statistics=statistics, **options)

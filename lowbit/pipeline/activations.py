"""Turn a weight-quantized model into a W8A8 one: calibrate static input scales, swap in ``ActQuantLinear``.

Static scales are calibrated on the model as it will run, after its weights were quantized (and,
for SmoothQuant, after the smoothing scales were folded in), with float activations: each
``QuantLinear``'s input goes into a streaming ``AbsHistogram`` over all calibration windows, and
the activation scheme's observer picks the threshold from it. Linears that read the same input
tensor (q/k/v, gate/up) share one histogram, seen by tensor identity as in the sequential pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lowbit.act_scheme import ActScheme
from lowbit.histogram import AbsHistogram
from lowbit.nn import quantized_layers, set_submodule
from lowbit.nn.act_linear import ActQuantLinear


@dataclass
class ActivationReport:
    """Per layer, the static clipping threshold and input scale (empty for dynamic schemes)."""

    scheme: ActScheme
    thresholds: dict[str, float] = field(default_factory=dict)
    input_scales: dict[str, float] = field(default_factory=dict)


@torch.no_grad()
def quantize_activations(model: nn.Module, act: ActScheme, calibration: Tensor | None = None, *,
                         histograms: dict[str, AbsHistogram] | None = None, batch_size: int = 8,
                         progress: bool = True) -> ActivationReport:
    """Replace every ``QuantLinear`` of ``model`` by an ``ActQuantLinear`` running ``act``, in place.

    Args:
        model: a model whose linears were already quantized to the weight scheme ``act`` needs
            (``act.weight_scheme()``: int8 or FP8 E4M3, per channel).
        act: the activation scheme.
        calibration: int64 token ids ``[samples, seqlen]``; static schemes need it or ``histograms``.
        histograms: per layer, histograms ``record_activation_histograms`` made on this model
            (lets several observers be compared on one calibration pass).
        batch_size: windows per calibration forward.

    Raises:
        ValueError: no quantized linear, a linear whose weight scheme the 8-bit product cannot take,
            a static scheme without calibration data, a layer the calibration never reached, or
            NaN/Inf activations.
    """
    layers = quantized_layers(model)
    if not layers:
        raise ValueError("the model has no quantized linear layers; quantize its weights first")
    for name, module in layers.items():
        act.check_weight_scheme(module.scheme, name)
    report = ActivationReport(act)
    if not act.dynamic:
        if histograms is None:
            histograms = record_activation_histograms(model, calibration, batch_size=batch_size, progress=progress)
        for name in layers:
            hist = histograms.get(name)
            if hist is None or hist.total == 0:
                raise ValueError(f"the calibration data never reached {name}, so it has no activation range; "
                                 "use calibration text that exercises every layer, or --dynamic")
            t = hist.threshold(act.observer, fake_quant=act.fake_quant, levels=256, percentile=act.percentile)
            report.thresholds[name] = t
            report.input_scales[name] = act.scale_for(t)
    for name, module in layers.items():
        set_submodule(model, name, ActQuantLinear.from_quant_linear(module, act, report.input_scales.get(name),
                                                                   layer=name))
    return report


@torch.no_grad()
def record_activation_histograms(model: nn.Module, calibration: Tensor | None, *, batch_size: int = 8,
                                 progress: bool = True) -> dict[str, AbsHistogram]:
    """Run ``model`` on every calibration window and histogram each ``QuantLinear``'s input ``|x|``.

    Raises:
        ValueError: no calibration data, or NaN/Inf activations (naming the layer).
    """
    if calibration is None or not isinstance(calibration, Tensor) or calibration.numel() == 0:
        raise ValueError("static activation quantization needs calibration data (--calib or the default "
                         "WikiText-2 valid windows); or use --act-mode dynamic")
    layers = quantized_layers(model)
    histograms: dict[str, AbsHistogram] = {}
    last: list[Any] = [None, None]  # the most recent input tensor and its histogram

    def hook(name: str):
        def record(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            x = args[0]
            if x is last[0]:  # q/k/v (gate/up) read one tensor: count it once
                histograms[name] = last[1]
                return
            hist = histograms.setdefault(name, AbsHistogram())
            try:
                hist.update(x)
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
            last[0], last[1] = x, hist

        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, calibration.shape[0], batch_size), desc="calibrate activations", unit="batch",
                          disable=not progress):
            model(input_ids=calibration[start:start + batch_size], use_cache=False)
            last[0] = last[1] = None
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return histograms

"""Turn a weight-quantized model into a W8A8 one: calibrate static input scales, swap in ``ActQuantLinear``.

Static scales are calibrated on the model as it will run, after its weights were quantized (and,
for SmoothQuant, after the smoothing scales were folded in), with float activations: each
``QuantLinear``'s input goes into a streaming ``AbsHistogram`` over all calibration windows, and
the activation scheme's observer picks the threshold from it. The model runs block by block through
the pipeline's statistics collector, whose sharing rule gives linears that read the same input
tensor (q/k/v, gate/up) one histogram.

A second histogram per input holds each token's largest magnitude. One per-tensor scale must cover
the largest token; where a few tokens (attention sinks: the first position, some delimiters) are
tens of times larger than the rest, the typical token is left a handful of the 127 levels. With
``ActScheme.outlier_ratio`` set, a layer whose threshold exceeds its median token's magnitude by
more than that ratio runs dynamic per-token scales instead, and the report names it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lowbit.act_scheme import ActScheme
from lowbit.histogram import AbsHistogram
from lowbit.nn import QuantLinear, quantized_layers, set_submodule
from lowbit.nn.act_linear import ActQuantLinear
from lowbit.pipeline.statistics import stream_input_statistics


@dataclass
class ActivationReport:
    """Per layer, the static clipping threshold and input scale (empty for dynamic schemes)."""

    scheme: ActScheme
    thresholds: dict[str, float] = field(default_factory=dict)
    input_scales: dict[str, float] = field(default_factory=dict)
    # static schemes with ``outlier_ratio``: layers that run dynamic per-token scales instead, with
    # their threshold / median token magnitude
    dynamic_layers: dict[str, float] = field(default_factory=dict)


@dataclass
class InputHistograms:
    """One linear input's calibration record: ``|x|`` of every value, and each token's ``max |x|``."""

    values: AbsHistogram = field(default_factory=AbsHistogram)
    token_max: AbsHistogram = field(default_factory=AbsHistogram)

    @property
    def total(self) -> int:
        return self.values.total

    def update(self, x: Tensor) -> None:
        self.values.update(x)
        self.token_max.update(torch.linalg.vector_norm(x.detach(), ord=float("inf"), dim=-1))  # max |x|, no |x| copy

    def threshold(self, observer: str, **kwargs: Any) -> float:
        """``AbsHistogram.threshold`` of the values."""
        return self.values.threshold(observer, **kwargs)

    def outlier_ratio(self, threshold: float) -> float:
        """How many times the median token's largest magnitude ``threshold`` is (inf for a zero median)."""
        median = self.token_max.quantile(0.5)
        return threshold / median if median > 0 else float("inf")


@torch.no_grad()
def quantize_activations(model: nn.Module, act: ActScheme, calibration: Tensor | None = None, *,
                         histograms: dict[str, InputHistograms] | None = None, batch_size: int = 8,
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
            ratio = hist.outlier_ratio(t)
            if act.outlier_ratio is not None and ratio > act.outlier_ratio:
                report.dynamic_layers[name] = ratio
                continue
            report.thresholds[name] = t
            report.input_scales[name] = act.scale_for(t)
    for name, module in layers.items():
        scheme = act.per_token_fallback() if name in report.dynamic_layers else act
        set_submodule(model, name, ActQuantLinear.from_quant_linear(module, scheme, report.input_scales.get(name),
                                                                   layer=name))
    return report


@torch.no_grad()
def record_activation_histograms(model: nn.Module, calibration: Tensor | None, *, batch_size: int = 8,
                                 progress: bool = True) -> dict[str, InputHistograms]:
    """Run ``model`` block by block on every calibration window (``statistics.stream_input_statistics``)
    and histogram each ``QuantLinear``'s input ``|x|`` and its tokens' largest magnitudes; linears
    that read one input tensor share one histogram.

    Raises:
        ValueError: no calibration data, an architecture the pipeline does not know, or NaN/Inf
            activations (naming the layer).
    """
    if calibration is None or not isinstance(calibration, Tensor) or calibration.numel() == 0:
        raise ValueError("static activation quantization needs calibration data (--calib or the default "
                         "WikiText-2 valid windows); or use --act-mode dynamic")
    histograms: dict[str, InputHistograms] = {}
    for records in stream_input_statistics(model, calibration, lambda m: isinstance(m, QuantLinear),
                                           new_record=InputHistograms, batch_size=batch_size, progress=progress):
        histograms.update(records)
    return histograms

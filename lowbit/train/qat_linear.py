"""``QatLinear``: a linear layer trained through fake quantization, and the swaps in and out of a model.

``prepare_qat`` replaces every ``QuantLinear`` of a quantized model (any PTQ result: RTN, GPTQ, AWQ,
HQQ, codebooks) by a ``QatLinear`` that starts exactly at it: its float weight is the dequantized
weight (every weight sits on its grid point, so the first forward reproduces the PTQ model bit for
bit, GPTQ's error compensation and AWQ's folded scales included) and its step sizes, zero-points or
codebook are the stored ones. ``convert_qat`` turns each back into a ``QuantLinear`` whose stored
codes and scales are exactly those of the last forward (``lowbit.train.fake_quant.to_quantized``).

A W8A8 layer (``ActQuantLinear``) keeps its activation scheme: the input is fake-quantized as the
8-bit product quantizes it, a static ``input_scale`` becomes a learned step size (LSQ on activations),
and ``convert_qat`` gives back an ``ActQuantLinear`` with the learned scale. LLM.int8 layers
(``Int8OutlierLinear``: float outlier columns chosen per input) have no trainer.

Two modes, EfficientQAT's two stages (Chen et al. 2024):
- Block-AP: weights and step sizes (and zero-points) learn; codes follow ``round(w / s)``.
- E2E-QP (``freeze_codes``): the codes are fixed and only the step sizes learn.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowbit.act_scheme import ActScheme
from lowbit.nn.act_linear import ActQuantLinear
from lowbit.nn.input_hadamard import has_input_hadamard
from lowbit.nn.int8_linear import Int8OutlierLinear
from lowbit.nn.qlinear import QuantLinear
from lowbit.nn.replace import set_submodule
from lowbit.quantizer import MIN_SCALE
from lowbit.qweight import QuantizedWeight
from lowbit.scheme import QuantScheme
from lowbit.train.fake_quant import (
    FakeQuantParams,
    check_trainable,
    fake_quantize,
    fake_quantize_activation,
    to_quantized,
)


class QatLinear(nn.Module):
    """``y = fq(x) fq(W)^T + b``. Parameters: ``weight``; ``log_scale`` (step sizes ``scale = scale_base *
    exp(log_scale)``), ``zero`` when asymmetric, or ``codebook``; ``log_input_scale`` for static W8A8
    (``fq(x)`` is ``x`` itself without ``act``).

    Step sizes learn in log space: Adam's steps are about ``lr`` in the parameter's own units, so in
    log space they are relative, and one learning rate fits an int3 group scale near 1e-2, an int8
    channel scale near 1e-4 and an activation scale near 1. ``exp(0)`` is exactly 1: training starts at
    the stored scales bit for bit."""

    def __init__(self, qweight: QuantizedWeight, bias: Tensor | None, act: ActScheme | None = None,
                 input_scale: Tensor | None = None) -> None:
        super().__init__()
        check_trainable(qweight.scheme)
        self.scheme: QuantScheme = qweight.scheme
        self.act = act
        self.out_features, self.in_features = qweight.shape
        params = FakeQuantParams.from_quantized(qweight)
        self.weight = nn.Parameter(qweight.dequantize(torch.float32))
        self._log_parameter("scale", params.scale)
        self._log_parameter("input_scale", None if act is None or act.dynamic else input_scale.detach().float().clone())
        for name in ("zero", "codebook"):
            value = getattr(params, name)
            setattr(self, name, None if value is None else nn.Parameter(value))
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        self.register_buffer("codes", None)

    def _log_parameter(self, name: str, start: Tensor | None) -> None:
        """``name`` = buffer ``{name}_base`` times ``exp`` of parameter ``log_{name}`` (zeros at the start)."""
        self.register_buffer(f"{name}_base", start)
        setattr(self, f"log_{name}", None if start is None else nn.Parameter(torch.zeros_like(start)))

    @property
    def scale(self) -> Tensor | None:
        return None if self.log_scale is None else self.scale_base * torch.exp(self.log_scale)

    @property
    def input_scale(self) -> Tensor | None:
        return None if self.log_input_scale is None else self.input_scale_base * torch.exp(self.log_input_scale)

    def params(self) -> FakeQuantParams:
        return FakeQuantParams(self.scale, self.zero, self.codebook)

    def fake_weight(self) -> Tensor:
        return fake_quantize(self.weight, self.params(), self.scheme, self.codes)[0]

    def forward(self, x: Tensor) -> Tensor:
        if self.act is not None:
            x = fake_quantize_activation(x, self.act, self.input_scale)
        return F.linear(x, self.fake_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def freeze_codes(self) -> None:
        """Keep the codes of the current weight from now on (E2E-QP); the weight stops learning."""
        self.codes = fake_quantize(self.weight, self.params(), self.scheme)[1]
        self.weight.requires_grad_(False)

    def to_quantized(self) -> QuantizedWeight:
        return to_quantized(self.weight.detach(), FakeQuantParams(*(None if p is None else p.detach() for p in
                                                                   (self.scale, self.zero, self.codebook))),
                            self.scheme, self.codes)

    def extra_repr(self) -> str:
        frozen = ", codes frozen" if self.codes is not None else ""
        act = f", act={self.act.describe()}" if self.act is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme.describe()}"
                f"{act}{frozen}")


def qat_layers(model: nn.Module) -> dict[str, QatLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QatLinear)}


def prepare_qat(model: nn.Module) -> dict[str, QatLinear]:
    """Replace every ``QuantLinear`` by a ``QatLinear`` starting at its stored weight, freeze every
    other parameter (embeddings, norms, a float ``lm_head``) and return the new layers by name.

    Raises:
        ValueError: the model has no quantized linear, or one whose scheme has no trainer, or one
            that rotates its input online (its trained weight would need the rotation too).
    """
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not quantized:
        raise ValueError("the model has no quantized linear layers to train; pass a lowbit checkpoint "
                         "(lowbit quantize ... -o DIR) as the student")
    for p in model.parameters():
        p.requires_grad_(False)
    layers = {}
    for name, module in quantized.items():
        if has_input_hadamard(module):
            raise ValueError(f"{name} rotates its input online (a rotated recipe); training rotated layers "
                             "is not supported yet: start from a recipe without rotation")
        if isinstance(module, Int8OutlierLinear):
            raise ValueError(f"{name} is an LLM.int8 layer (float outlier columns chosen per input), which has no "
                             "trainer; start from a W8A8 (--act) or weight-only checkpoint")
        act = module.act if isinstance(module, ActQuantLinear) else None
        layers[name] = QatLinear(module.quantized_weight(), module.bias, act,
                                 getattr(module, "input_scale", None) if act is not None else None)
        set_submodule(model, name, layers[name])
    return layers


def convert_qat(model: nn.Module) -> dict[str, QuantLinear]:
    """Replace every ``QatLinear`` by the ``QuantLinear`` of its last forward's codes and scales (an
    ``ActQuantLinear`` with the learned input scale where it quantizes activations)."""
    converted = {}
    for name, module in qat_layers(model).items():
        layer = QuantLinear.from_quantized(module.to_quantized(), module.bias)
        if module.act is not None:
            scale = None if module.input_scale is None else float(module.input_scale.detach().clamp(min=MIN_SCALE))
            layer = ActQuantLinear.from_quant_linear(layer, module.act, scale, layer=name)
        converted[name] = layer
        set_submodule(model, name, converted[name])
    return converted

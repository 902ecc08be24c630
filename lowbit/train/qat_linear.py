"""``QatLinear``: a linear layer trained through fake quantization, and the swaps in and out of a model.

``prepare_qat`` replaces every ``QuantLinear`` of a quantized model (any PTQ result: RTN, GPTQ, AWQ,
HQQ, codebooks) by a ``QatLinear`` that starts exactly at it: its float weight is the dequantized
weight (every weight sits on its grid point, so the first forward reproduces the PTQ model bit for
bit, GPTQ's error compensation and AWQ's folded scales included) and its step sizes, zero-points or
codebook are the stored ones. ``convert_qat`` turns each back into a ``QuantLinear`` whose stored
codes and scales are exactly those of the last forward (``lowbit.train.fake_quant.to_quantized``).

Two modes, EfficientQAT's two stages (Chen et al. 2024):
- Block-AP: weights and step sizes (and zero-points) learn; codes follow ``round(w / s)``.
- E2E-QP (``freeze_codes``): the codes are fixed and only the step sizes learn.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowbit.nn.input_hadamard import has_input_hadamard
from lowbit.nn.qlinear import QuantLinear
from lowbit.nn.replace import set_submodule
from lowbit.qweight import QuantizedWeight
from lowbit.scheme import QuantScheme
from lowbit.train.fake_quant import FakeQuantParams, check_trainable, fake_quantize, to_quantized


class QatLinear(nn.Module):
    """``y = x fq(W)^T + b``; parameters ``weight``, ``scale``, ``zero`` (when asymmetric) or ``codebook``."""

    def __init__(self, qweight: QuantizedWeight, bias: Tensor | None) -> None:
        super().__init__()
        check_trainable(qweight.scheme)
        self.scheme: QuantScheme = qweight.scheme
        self.out_features, self.in_features = qweight.shape
        params = FakeQuantParams.from_quantized(qweight)
        self.weight = nn.Parameter(qweight.dequantize(torch.float32))
        for name in ("scale", "zero", "codebook"):
            value = getattr(params, name)
            setattr(self, name, None if value is None else nn.Parameter(value))
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        self.register_buffer("codes", None)

    def params(self) -> FakeQuantParams:
        return FakeQuantParams(self.scale, self.zero, self.codebook)

    def fake_weight(self) -> Tensor:
        return fake_quantize(self.weight, self.params(), self.scheme, self.codes)[0]

    def forward(self, x: Tensor) -> Tensor:
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
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme.describe()}{frozen}"


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
        layers[name] = QatLinear(module.quantized_weight(), module.bias)
        set_submodule(model, name, layers[name])
    return layers


def convert_qat(model: nn.Module) -> dict[str, QuantLinear]:
    """Replace every ``QatLinear`` by the ``QuantLinear`` of its last forward's codes and scales."""
    converted = {}
    for name, module in qat_layers(model).items():
        converted[name] = QuantLinear.from_quantized(module.to_quantized(), module.bias)
        set_submodule(model, name, converted[name])
    return converted

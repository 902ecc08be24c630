"""``QuantLoraLinear``: peft's LoRA on top of lowbit's ``QuantLinear`` (QLoRA, Dettmers et al. 2023).

Registered with peft through ``LoraConfig._register_custom_module({QuantLinear: QuantLoraLinear})``,
so the adapter is peft's own (``lora_A``/``lora_B`` names, ``save_pretrained`` format): an adapter
trained here loads with ``PeftModel.from_pretrained`` on a float base. The frozen base keeps its
packed codes; each forward dequantizes it transiently (gradients flow to the input, never to the
codes), so no float copy of the base weight is ever stored.

Merging adds ``scaling * B @ A`` to the dequantized weight and quantizes the sum again with the base
layer's scheme (round to nearest): the merged model stays at the base's size, and the requantization
error is measured, not assumed away (``bench/qlora.py``).
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora import LoraConfig, LoraLayer
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import Tensor, nn

from lowbit.hadamard import hadamard_transform
from lowbit.methods.rtn import quantize_rtn
from lowbit.nn.input_hadamard import has_input_hadamard
from lowbit.nn.qlinear import QuantLinear
from lowbit.nn.replace import set_submodule


class QuantLoraLinear(nn.Module, LoraLayer):
    """``y = base(x) + scaling * lora_B(lora_A(dropout(x)))`` with a frozen quantized ``base``."""

    def __init__(self, base_layer: QuantLinear, adapter_name: str, config: LoraConfig, r: int = 0,
                 lora_alpha: int = 1, **kwargs: Any) -> None:
        if config.lora_bias or config.use_dora:
            raise ValueError("lowbit's quantized LoRA layer supports plain LoRA only (no lora_bias, no DoRA)")
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        self.fan_in_fan_out = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def _get_base_layer_device_and_dtype(self, base_layer: QuantLinear) -> tuple[torch.device, torch.dtype | None]:
        """The adapter lives beside the codes and computes in the base's compute dtype (float32 if unset)."""
        return base_layer.qdata.device, base_layer.compute_dtype

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        result = self.base_layer(x)
        if self.disable_adapters or self.merged:
            return result
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            lora_A, lora_B = self.lora_A[name], self.lora_B[name]
            delta = lora_B(lora_A(self.lora_dropout[name](x.to(lora_A.weight.dtype)))) * self.scaling[name]
            result = result + delta.to(result.dtype)
        return result

    def get_delta_weight(self, adapter: str) -> Tensor:
        return (self.lora_B[adapter].weight @ self.lora_A[adapter].weight) * self.scaling[adapter]

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold the adapters into the base: dequantize, add ``B @ A * scaling``, quantize again."""
        for name in check_adapters_to_merge(self, adapter_names):
            if name not in self.lora_A:
                continue
            base = self.get_base_layer()
            delta = self.get_delta_weight(name).float()
            if has_input_hadamard(base):  # the base weight reads rotated inputs, the adapter plain ones
                delta = hadamard_transform(delta)
            weight = base.quantized_weight().dequantize(torch.float32) + delta
            if safe_merge and not torch.isfinite(weight).all():
                raise ValueError(f"merging adapter {name!r} gives non-finite weights; the adapter is broken")
            merged = QuantLinear.from_quantized(quantize_rtn(weight, base.scheme), base.bias)
            merged.compute_dtype = base.compute_dtype
            set_submodule(self, "base_layer", merged)  # keeps the base's online input rotation
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        raise ValueError("a merged quantized layer cannot be unmerged (the merge re-quantized it); "
                         "reload the base and the adapter instead")

    def __repr__(self) -> str:
        return "lora." + super().__repr__()

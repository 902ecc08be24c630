"""``ActQuantLinear``: a W8A8 linear layer, 8-bit weights times 8-bit activations.

The weight stays a ``QuantizedWeight`` (int8 symmetric or FP8 E4M3, one scale per output row). Each
forward quantizes the input (``ActScheme``: dynamic per token or per tensor, or static with the
calibrated ``input_scale`` buffer) and runs the 8-bit product of ``lowbit.nn.matmul8``; the result
is rescaled by ``scale_x[m] * scale_w[n]`` and the float bias added. No float copy of the weight
is made: the int8 operand is a reinterpretation of the stored offset-binary codes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowbit.act_scheme import ActFormat, ActScheme, quantize_activation
from lowbit.nn.matmul8 import scaled_fp8_matmul, scaled_int8_matmul
from lowbit.nn.qlinear import QuantLinear
from lowbit.scheme import QuantScheme


class ActQuantLinear(QuantLinear):
    """``y = dequant(quant(x) @ W_q^T) + b`` with an 8-bit product (see the module docstring)."""

    def __init__(self, in_features: int, out_features: int, scheme: QuantScheme, act: ActScheme, bias: bool = False,
                 bias_dtype: torch.dtype = torch.float32, layer: str = "layer") -> None:
        act.check_weight_scheme(scheme, layer)
        super().__init__(in_features, out_features, scheme, bias, bias_dtype)
        self.act = act
        if not act.dynamic:
            self.register_buffer("input_scale", torch.zeros((), dtype=torch.float32))

    @classmethod
    def from_quant_linear(cls, module: QuantLinear, act: ActScheme, input_scale: float | None = None,
                          layer: str = "layer") -> ActQuantLinear:
        """Wrap an already quantized layer's buffers (shared, not copied); static schemes need ``input_scale``."""
        new = cls(module.in_features, module.out_features, module.scheme, act, module.bias is not None, layer=layer)
        for name, tensor in module.quantized_weight().tensors().items():
            setattr(new, name, tensor)
        if module.bias is not None:
            new.bias = module.bias
        if not act.dynamic:
            if input_scale is None or not input_scale > 0:
                raise ValueError(f"{layer}: static activation quantization needs a positive input scale, "
                                 f"got {input_scale!r}")
            new.input_scale = torch.tensor(float(input_scale), dtype=torch.float32)
        return new

    def weight_operand(self) -> tuple[Tensor, Tensor]:
        """``(codes [in, out], scale [1, out])``: the weight as the 8-bit product's right operand."""
        codes = self.qdata  # 8-bit codes are stored one per byte: packing is the identity
        if self.act.format is ActFormat.INT8:
            codes = (codes ^ 0x80).view(torch.int8)  # offset binary -> two's complement: q + 128 -> q
        else:
            codes = codes.view(torch.float8_e4m3fn)  # lowbit's E4M3 codes are the OCP bit layout: a free view
        # the 8-bit schemes have plain float16 scales (no double quantization): read the buffer
        # directly instead of rebuilding and re-validating a QuantizedWeight on every forward
        scale = self.scale.float().reshape(-1, 1).expand(self.out_features, 1).reshape(1, -1)
        # [in, out] as a transposed view of the row-major [out, in] codes: the layout oneDNN's int8
        # kernel takes without a reorder (a row-major [in, out] copy is ~50x slower at M = 1)
        return codes.t(), scale.contiguous()

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        a, scale_a = quantize_activation(x.reshape(-1, self.in_features), self.act,
                                         None if self.act.dynamic else self.input_scale)
        b, scale_b = self.weight_operand()
        matmul = scaled_int8_matmul if self.act.format is ActFormat.INT8 else scaled_fp8_matmul
        y = matmul(a, scale_a, b, scale_b)
        if self.bias is not None:
            y = y + self.bias.float()
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, act={self.act.describe()}"

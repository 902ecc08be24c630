"""``QuantLinear``: a linear layer whose weight lives as a ``QuantizedWeight``.

The module keeps only the packed codes and scales (as buffers, so ``state_dict`` and checkpoints
see exactly what is stored); the float weight is rebuilt for each forward and dropped after it.
That costs a dequantization per call but keeps the resident model at its quantized size.
``compute_dtype`` (bitsandbytes' ``bnb_4bit_compute_dtype``) picks the dtype the product runs in;
by default the input's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowbit.qweight import QuantizedWeight, expected_tensors
from lowbit.scheme import QuantScheme


class QuantLinear(nn.Module):
    """``y = x W'^T + b`` with ``W'`` the dequantized weight, computed in ``x``'s dtype."""

    def __init__(self, in_features: int, out_features: int, scheme: QuantScheme, bias: bool = False,
                 bias_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.scheme = scheme
        for name, (shape, dtype) in expected_tensors(scheme, (out_features, in_features)).items():
            self.register_buffer(name, torch.zeros(shape, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=bias_dtype), requires_grad=False) if bias else None
        self.compute_dtype: torch.dtype | None = None

    @classmethod
    def from_quantized(cls, qweight: QuantizedWeight, bias: Tensor | None = None) -> QuantLinear:
        out_features, in_features = qweight.shape
        module = cls(in_features, out_features, qweight.scheme, bias is not None,
                     bias.dtype if bias is not None else torch.float32)
        for name, tensor in qweight.tensors().items():
            setattr(module, name, tensor)
        if bias is not None:
            module.bias.data = bias.detach().clone()
        return module

    @property
    def qweight(self) -> Tensor:
        """The packed codes under the name GPTQ-style layers give them: peft finds a quantized base
        layer's device through ``qweight`` (``LoraModel._replace_module``)."""
        return self.qdata

    def quantized_weight(self) -> QuantizedWeight:
        """The stored weight as a ``QuantizedWeight`` (a view on the buffers, no copy)."""
        names = expected_tensors(self.scheme, (self.out_features, self.in_features))
        return QuantizedWeight.from_tensors(self.scheme, (self.out_features, self.in_features),
                                            {name: getattr(self, name) for name in names})

    def forward(self, x: Tensor) -> Tensor:
        dtype = self.compute_dtype or x.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(x.to(dtype), self.quantized_weight().dequantize(dtype), bias).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme.describe()}"

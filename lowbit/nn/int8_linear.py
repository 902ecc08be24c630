"""``Int8OutlierLinear``: LLM.int8() (Dettmers et al. 2022), 8-bit weights with outlier decomposition.

Per-token int8 activations fail on the few hidden dimensions whose magnitudes reach 20-100x the
rest (``bench/activations.py`` measured +3.2% perplexity for plain dynamic W8A8 on SmolLM2). LLM.int8
splits each product by input column: the columns in which any token of this input exceeds
``threshold`` (6.0 in the paper) are multiplied in float, the rest run as int8 x int8 -> int32
(``torch._int_mm``). The weight is stored once, int8 per output row (absmax / 127); the outlier
columns multiply its dequantized rows, as bitsandbytes does. Which columns are outliers is decided
per forward from the input, so no calibration is needed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowbit.act_scheme import ActScheme, quantize_activation
from lowbit.nn.act_linear import ActQuantLinear
from lowbit.nn.matmul8 import scaled_int8_matmul
from lowbit.scheme import QuantScheme

INT8_WEIGHT = QuantScheme(format="int", bits=8, granularity="channel", symmetric=True)
INT8_TOKENS = ActScheme(format="int8", dynamic=True, granularity="token")


class Int8OutlierLinear(ActQuantLinear):
    """``y = x[:, O] W[:, O]^T + dequant(int8(x[:, ~O]) @ int8(W[:, ~O])^T) + b``, O = outlier columns.

    ``outlier_stats()`` reports how many columns took the float path: per call at most, on average,
    and how many distinct columns ever did (the paper finds them concentrated in a few dimensions).
    """

    def __init__(self, in_features: int, out_features: int, threshold: float = 6.0, bias: bool = False,
                 bias_dtype: torch.dtype = torch.float32, layer: str = "layer") -> None:
        if not threshold > 0:
            raise ValueError(f"{layer}: the LLM.int8 outlier threshold must be positive, got {threshold!r}")
        super().__init__(in_features, out_features, INT8_WEIGHT, INT8_TOKENS, bias, bias_dtype, layer)
        self.threshold = float(threshold)
        # statistics, not state: a plain attribute, so loaders neither save nor re-materialize it
        self.outlier_seen = torch.zeros(in_features, dtype=torch.bool)
        self.calls = 0
        self.outlier_columns_total = 0
        self.outlier_columns_max = 0

    @classmethod
    def from_quant_linear(cls, module, threshold: float = 6.0, layer: str = "layer") -> Int8OutlierLinear:
        """Wrap an int8 per-channel symmetric ``QuantLinear``'s buffers (shared, not copied)."""
        if module.scheme != INT8_WEIGHT:
            raise ValueError(f"{layer}: LLM.int8 needs int8 per-channel symmetric weights, got "
                             f"{module.scheme.describe()}")
        new = cls(module.in_features, module.out_features, threshold, module.bias is not None, layer=layer)
        for name, tensor in module.quantized_weight().tensors().items():
            setattr(new, name, tensor)
        if module.bias is not None:
            new.bias = module.bias
        return new

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).float()
        b, scale_b = self.weight_operand()  # int8 [in, out], float32 [1, out]
        outliers = (x2.abs() > self.threshold).any(dim=0).nonzero().squeeze(1)
        self._count(outliers)
        y_outlier = None
        if outliers.numel():
            # float path: those input columns times the dequantized weight columns [n_outliers, out]
            y_outlier = x2[:, outliers] @ (b[outliers].float() * scale_b)
            x2 = x2.index_fill(1, outliers, 0.0)
        a, scale_a = quantize_activation(x2, self.act)
        y = scaled_int8_matmul(a, scale_a, b, scale_b)
        if y_outlier is not None:
            y += y_outlier
        if self.bias is not None:
            y += self.bias.float()
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def _count(self, outliers: Tensor) -> None:
        n = outliers.numel()
        self.calls += 1
        self.outlier_columns_total += n
        self.outlier_columns_max = max(self.outlier_columns_max, n)
        if n:
            self.outlier_seen = self.outlier_seen.to(outliers.device)
            self.outlier_seen[outliers] = True

    def outlier_stats(self) -> dict[str, float]:
        """Outlier columns since the last ``reset_outlier_stats``: max and mean per call, distinct ever."""
        return {"calls": self.calls, "max_per_call": self.outlier_columns_max,
                "mean_per_call": self.outlier_columns_total / self.calls if self.calls else 0.0,
                "distinct": int(self.outlier_seen.sum()), "in_features": self.in_features}

    def reset_outlier_stats(self) -> None:
        self.calls = self.outlier_columns_total = self.outlier_columns_max = 0
        self.outlier_seen.zero_()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, threshold={self.threshold}"

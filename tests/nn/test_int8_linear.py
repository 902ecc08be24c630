"""LLM.int8(): outlier input columns go through float, the rest through a real int8 product."""

from __future__ import annotations

import pytest
import torch

from lowbit.act_scheme import quantize_activation
from lowbit.methods.rtn import quantize_rtn
from lowbit.nn import QuantLinear
from lowbit.nn.act_linear import ActQuantLinear
from lowbit.nn.int8_linear import INT8_TOKENS, INT8_WEIGHT, Int8OutlierLinear

OUTLIERS = [3, 100, 200]


def _layer(threshold: float = 6.0, seed: int = 0) -> Int8OutlierLinear:
    g = torch.Generator().manual_seed(seed)
    weight, bias = torch.randn(512, 256, generator=g) * 0.05, torch.randn(512, generator=g)
    return Int8OutlierLinear.from_quant_linear(QuantLinear.from_quantized(quantize_rtn(weight, INT8_WEIGHT), bias),
                                               threshold)


def _input(seed: int = 1) -> torch.Tensor:
    x = torch.randn(2, 16, 256, generator=torch.Generator().manual_seed(seed))
    x[0, 5, OUTLIERS] = torch.tensor([40.0, -25.0, 60.0])  # one token carries planted outlier features
    return x


def test_outlier_columns_go_through_float_and_the_rest_through_int8():
    layer, x = _layer(), _input()
    y = layer(x)
    x2 = x.reshape(-1, 256).double()
    w = layer.quantized_weight().dequantize().double()  # [out, in]
    inliers = [c for c in range(256) if c not in OUTLIERS]
    codes, scale = quantize_activation(x2[:, inliers].float(), INT8_TOKENS)
    ref = (x2[:, OUTLIERS] @ w[:, OUTLIERS].T + (codes.double() * scale.double()) @ w[:, inliers].T
           + layer.bias.double())
    assert torch.allclose(y.reshape(-1, 512).double(), ref, atol=1e-4, rtol=1e-5)
    stats = layer.outlier_stats()
    assert stats["max_per_call"] == len(OUTLIERS) and stats["distinct"] == len(OUTLIERS)


def test_decomposition_beats_plain_int8_activations_on_outliers():
    layer, x = _layer(), _input()
    exact = x @ layer.quantized_weight().dequantize().T + layer.bias
    plain = ActQuantLinear.from_quant_linear(layer, INT8_TOKENS)
    err_int8 = (layer(x) - exact).abs().max()
    err_plain = (plain(x) - exact).abs().max()
    assert err_int8 * 10 < err_plain


def test_without_outliers_it_is_plain_w8a8():
    layer = _layer()
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(2))  # |x| < 6 everywhere
    assert x.abs().max() < 6
    assert torch.equal(layer(x), ActQuantLinear.from_quant_linear(layer, INT8_TOKENS)(x))
    assert layer.outlier_stats()["distinct"] == 0


def test_bad_threshold_and_weight_scheme_are_refused():
    with pytest.raises(ValueError, match="threshold must be positive"):
        Int8OutlierLinear(256, 256, threshold=0.0)
    four_bit = QuantLinear.from_quantized(quantize_rtn(torch.randn(256, 256), INT8_WEIGHT.__class__(bits=4)))
    with pytest.raises(ValueError, match="int8 per-channel symmetric"):
        Int8OutlierLinear.from_quant_linear(four_bit)

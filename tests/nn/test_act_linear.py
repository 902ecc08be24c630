"""W8A8: the 8-bit products are real low-precision kernels and equal the float product of the
dequantized operands (exactly for int8, up to float32 accumulation order for FP8)."""

from __future__ import annotations

import pytest
import torch

from lowbit.act_scheme import ActScheme, quantize_activation
from lowbit.methods.rtn import quantize_rtn
from lowbit.nn import QuantLinear
from lowbit.nn.act_linear import ActQuantLinear
from lowbit.nn.matmul8 import int8_matmul, scaled_fp8_matmul
from lowbit.scheme import QuantScheme


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_int8_matmul_is_exact():
    a = torch.randint(-128, 128, (37, 256), dtype=torch.int8, generator=_gen(0))
    b = torch.randint(-128, 128, (256, 512), dtype=torch.int8, generator=_gen(1))
    out = int8_matmul(a, b)
    assert out.dtype == torch.int32
    assert torch.equal(out, a.to(torch.int64).matmul(b.to(torch.int64)).to(torch.int32))


def test_fp8_matmul_equals_the_float_product_of_its_operands():
    a = (torch.randn(19, 256, generator=_gen(2)) * 30).to(torch.float8_e4m3fn)
    b = (torch.randn(256, 512, generator=_gen(3)) * 30).to(torch.float8_e4m3fn)
    sa, sb = torch.rand(19, 1, generator=_gen(4)) + 0.5, torch.rand(1, 512, generator=_gen(5)) + 0.5
    out = scaled_fp8_matmul(a, sa, b, sb)
    ref = (a.double() @ b.double()) * sa.double() * sb.double()
    # products are exact; float32 accumulation in any order errs by at most ~K eps sum|terms|
    bound = (a.double().abs() @ b.double().abs()) * sa.double() * sb.double() * 256 * 2.0**-24
    assert bool(((out.double() - ref).abs() <= bound).all())


@pytest.mark.parametrize("act", [ActScheme(), ActScheme(granularity="tensor"), ActScheme(format="fp8_e4m3"),
                                 ActScheme(format="fp8_e4m3", granularity="tensor")])
def test_act_linear_equals_the_float_product_of_the_dequantized_operands(act):
    """The layer's output is (quantized x) @ (quantized W)^T + b, computed in float64 from the
    codes and scales: exact for int8 up to the final float32 rescale, and close for FP8."""
    w = torch.randn(512, 256, generator=_gen(6))
    bias = torch.randn(512, generator=_gen(7))
    layer = ActQuantLinear.from_quant_linear(
        QuantLinear.from_quantized(quantize_rtn(w, act.weight_scheme()), bias), act)
    x = torch.randn(2, 9, 256, generator=_gen(8)) * 3
    x[..., 5] *= 40  # an outlier channel
    codes, scale = quantize_activation(x.reshape(-1, 256), act)
    qw = layer.quantized_weight()
    ref = (codes.double() * scale.double()) @ qw.dequantize().double().T + bias.double()
    out = layer(x)
    assert out.shape == (2, 9, 512) and out.dtype == torch.float32
    torch.testing.assert_close(out.double().reshape(-1, 512), ref, rtol=1e-6, atol=1e-4)
    # and the whole thing approximates the float layer
    err = (out - torch.nn.functional.linear(x, w, bias)).norm() / torch.nn.functional.linear(x, w, bias).norm()
    assert err < (0.06 if act.granularity == "token" else 0.1), err  # the outlier costs per-tensor scales most


def test_dynamic_per_token_scales_follow_each_token():
    x = torch.tensor([[1.0, -2.0, 0.5], [100.0, 3.0, -50.0], [0.0, 0.0, 0.0]])
    codes, scale = quantize_activation(x, ActScheme())
    torch.testing.assert_close(scale.squeeze(1)[:2], torch.tensor([2.0, 100.0]) / 127)
    assert codes.dtype == torch.int8 and codes[0, 1] == -127 and codes[1, 0] == 127
    assert torch.equal(codes[2], torch.zeros(3, dtype=torch.int8))  # an all-zero token stays zero


def test_static_scale_clips_beyond_the_threshold():
    act = ActScheme(dynamic=False, granularity="tensor")
    codes, scale = quantize_activation(torch.tensor([[1.0, -5.0, 300.0]]), act, torch.tensor(1.0))
    assert codes.tolist() == [[1, -5, 127]] and float(scale[0, 0]) == 1.0
    with pytest.raises(ValueError, match="input_scale"):
        quantize_activation(torch.ones(1, 3), act)


def test_weight_scheme_the_product_cannot_take_is_refused():
    int4 = QuantScheme(bits=4, group_size=64)
    with pytest.raises(ValueError, match="int8 activations need int8 per-channel weights.*--bits 8 --sym"):
        ActQuantLinear(256, 256, int4, ActScheme(), layer="model.layers.0.mlp.up_proj")
    with pytest.raises(ValueError, match="fp8_e4m3 activations need"):
        ActScheme(format="fp8_e4m3").check_weight_scheme(QuantScheme(bits=8, granularity="channel"))


def test_act_scheme_validation_and_round_trip():
    with pytest.raises(ValueError, match="static activation scales are per tensor"):
        ActScheme(dynamic=False, granularity="token")
    with pytest.raises(ValueError, match="unknown activation observer"):
        ActScheme(dynamic=False, granularity="tensor", observer="entropy")
    with pytest.raises(ValueError, match="kl observer .* fp8"):
        ActScheme(format="fp8_e4m3", dynamic=False, granularity="tensor", observer="kl")
    act = ActScheme(dynamic=False, granularity="tensor", observer="percentile", percentile=99.9)
    assert ActScheme.from_dict(act.to_dict()) == act
    assert act.describe() == "int8 static (percentile 99.9)"

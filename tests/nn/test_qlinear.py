import torch
import torch.nn.functional as F

from lowbit.methods.rtn import quantize_rtn
from lowbit.nn import QuantLinear
from lowbit.scheme import QuantScheme


def test_forward_is_linear_with_the_dequantized_weight():
    g = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(512, 256, bias=True)
    qw = quantize_rtn(linear.weight.data, QuantScheme(bits=4, group_size=64, symmetric=False))
    module = QuantLinear.from_quantized(qw, linear.bias.data)
    x = torch.randn(3, 7, 512, generator=g)
    assert torch.equal(module(x), F.linear(x, qw.dequantize(), linear.bias.data))
    assert module(x.to(torch.bfloat16)).dtype == torch.bfloat16


def test_stores_only_packed_codes_and_scales():
    linear = torch.nn.Linear(1024, 1024, bias=False)
    for scheme, ratio in ((QuantScheme(bits=4, group_size=64), (4 + 16 / 64) / 32),
                          (QuantScheme(bits=3, group_size=64), (3 + 16 / 64) / 32),
                          (QuantScheme(format="nf4", group_size=64, double_quant=True), 4.127 / 32)):
        module = QuantLinear.from_quantized(quantize_rtn(linear.weight.data, scheme))
        stored = sum(t.numel() * t.element_size() for t in module.state_dict().values())
        assert not any(p.numel() for p in module.parameters())
        assert abs(stored / (1024 * 1024 * 4) - ratio) < 0.001


def test_qweight_view_round_trips_buffers():
    linear = torch.nn.Linear(256, 128)
    qw = quantize_rtn(linear.weight.data, QuantScheme(format="nf4", group_size=32, double_quant=True))
    again = QuantLinear.from_quantized(qw).quantized_weight()
    assert torch.equal(again.dequantize(), qw.dequantize())

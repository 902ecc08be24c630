"""The kernel table: selection by (scheme, device), the explicit prepare step, and each kernel
against the reference (dequantize + ``F.linear``)."""

import pytest
import torch
from torch import nn

from lowbit.methods.rtn import quantize_rtn
from lowbit.nn import KERNELS, Kernel, QuantLinear, prepare_kernels, register_kernel, select_kernel
from lowbit.nn.kernels import REFERENCE
from lowbit.scheme import QuantScheme

INT8_CHANNEL = QuantScheme(bits=8, granularity="channel")


def _layer(scheme, out=512, inp=768, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    b = torch.randn(out, generator=g) if bias else None
    return QuantLinear.from_quantized(quantize_rtn(w, scheme), b)


def test_reference_comes_last_and_applies_to_everything():
    assert KERNELS[-1] is REFERENCE
    kernel, _ = select_kernel(QuantScheme(format="nf4", group_size=64), "cuda")
    assert kernel is REFERENCE


@pytest.mark.parametrize("kernel", [k for k in KERNELS if k is not REFERENCE], ids=lambda k: k.name)
@pytest.mark.parametrize("rows", [1, 3, 64])
def test_kernels_equal_the_reference(kernel, rows):
    layer = _layer(INT8_CHANNEL)
    why = kernel.supports(layer.scheme, torch.device("cpu"))
    if why is not None:
        pytest.skip(f"{kernel.name}: {why}")
    x = torch.randn(rows, layer.in_features, generator=torch.Generator().manual_seed(rows))
    got = kernel.forward(x, kernel.prepare(layer.quantized_weight()), layer.bias)
    torch.testing.assert_close(got, layer(x), rtol=1e-5, atol=1e-4)


def test_prepare_is_explicit_and_loading_buffers_drops_it():
    layer = _layer(INT8_CHANNEL)
    assert layer.kernel_name == "reference"  # nothing prepared behind the user's back
    layer.to(torch.float32)
    assert layer.prepared is None
    layer.prepare_kernel()
    assert layer.prepared is not None
    layer.load_state_dict(_layer(INT8_CHANNEL, seed=1).state_dict())
    assert layer.prepared is None
    x = torch.randn(2, layer.in_features)
    torch.testing.assert_close(layer(x), _layer(INT8_CHANNEL, seed=1)(x))


def test_prepared_layout_on_another_device_is_refused_in_one_line():
    layer = _layer(INT8_CHANNEL)
    layer.prepare_kernel()
    x = torch.randn(2, layer.in_features, device="meta")
    with pytest.raises(ValueError, match="prepared for cpu, the input is on meta; call lowbit.nn.prepare_kernels"):
        layer(x)


def test_prepare_kernels_names_the_layers_left_on_the_reference():
    model = nn.Sequential(_layer(INT8_CHANNEL), _layer(QuantScheme(format="ternary", bits=2, group_size=64), out=768,
                                                        inp=512))
    with pytest.warns(UserWarning, match=r"1 quantized layers run the reference path .* e\.g\. 1 \(ternary g64"):
        chosen = prepare_kernels(model, activations="float32")
    first = select_kernel(INT8_CHANNEL, "cpu")[0].name
    assert chosen == {first: ["0"], "reference": ["1"]} and first != "reference"


def test_a_registered_kernel_is_chosen_before_the_reference():
    calls = []

    def forward(x, layout, bias):
        calls.append(x.shape)
        return REFERENCE.forward(x, layout, bias)

    toy = Kernel("toy-test", lambda s, d: None if s.format.value == "ternary" else "ternary only", lambda qw: qw,
                 forward)
    register_kernel(toy)
    try:
        layer = _layer(QuantScheme(format="ternary", bits=2, group_size=32))
        assert layer.prepare_kernel() == "toy-test"
        layer(torch.randn(5, layer.in_features))
        assert calls == [torch.Size([5, layer.in_features])]
        with pytest.raises(ValueError, match="already registered"):
            register_kernel(toy)
    finally:
        KERNELS.remove(toy)

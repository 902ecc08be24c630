"""The integer-activation kernels: the product with x rounded per block of 64, and exact prefill.

For few rows of x the kernel computes ``F.linear(x_hat, W)`` where ``x_hat`` is x rounded per block of
64 to int8, or to 16-bit fixed point as two int8 halves (``round_activations`` below restates that
rounding independently); the integer dot products are exact, so it differs from that product by
float32 rounding only. Many rows
dequantize the exact weights into the float32 GEMM, as the float kernels do. Skipped where the CPU
lacks AVX-512 VNNI or the kernels are unavailable.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lowbit.kernels import linear, prepare, status
from lowbit.kernels.cpu import GEMM_MIN_ROWS, concatenate, int8_activations_reason
from lowbit.scheme import QuantScheme
from tests.kernels.test_cpu import OUT_FEATURES, random_weight

_PROBLEM = status() or int8_activations_reason(QuantScheme(bits=4, group_size=64))
pytestmark = pytest.mark.skipif(_PROBLEM is not None, reason=f"int8-activation kernels unavailable: {_PROBLEM}")

FORMATS = {
    "int4": dict(bits=4), "int4-asym": dict(bits=4, symmetric=False),
    "int4-fmin": dict(bits=4, symmetric=False, zero_point="float"),
    "int8": dict(bits=8), "int8-asym": dict(bits=8, symmetric=False),
    "int3": dict(bits=3), "int3-asym": dict(bits=3, symmetric=False),
    "int3-fmin": dict(bits=3, symmetric=False, zero_point="float"),
}
GROUPINGS = {"g64": (dict(group_size=64), 192), "g128": (dict(group_size=128), 384),
             "channel": (dict(granularity="channel"), 320), "tensor": (dict(granularity="tensor"), 128)}


def round_activations(x: torch.Tensor, activations: str) -> torch.Tensor:
    """x rounded: with ``t = x * 127 / absmax``, int8 is ``round(t) absmax / 127`` with the absmax of each
    block of 64; int16 adds the rounded remainder in 256ths, ``(round(t) + round(256 (t - round(t))) / 256)
    absmax / 127``, with the absmax of the row."""
    blocks = x.reshape(x.shape[0], -1, 64) if activations == "int8" else x.reshape(x.shape[0], 1, -1)
    absmax = blocks.abs().amax(-1, keepdim=True)
    inverse = torch.where(absmax > 0, torch.tensor(127.0) / absmax, torch.zeros(()))
    t = blocks * inverse
    hi = t.round()
    if activations == "int8":
        return (hi * (absmax / 127)).reshape_as(x)
    lo = ((t - hi) * 256).round().clamp(-127, 127)
    return ((hi * 256 + lo) * (absmax / 127 / 256)).reshape_as(x)


def assert_close_to(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> None:
    ref = F.linear(x, w, bias)
    bound = 256 * torch.finfo(torch.float32).eps * (F.linear(x.abs(), w.abs()) + (0 if bias is None else bias.abs()))
    excess = ((got - ref).abs() - bound).max()
    assert excess <= 0, f"differs from the product by {excess:.3g} beyond float32 rounding"


@pytest.mark.parametrize("activations", ["int8", "int16"])
@pytest.mark.parametrize("grouping", GROUPINGS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_few_rows_compute_the_product_with_rounded_x(fmt, grouping, activations):
    fields, in_features = GROUPINGS[grouping]
    qw = random_weight(QuantScheme(**FORMATS[fmt], **fields), (OUT_FEATURES, in_features))
    prepared = prepare(qw, activations=activations)
    assert prepared.activations == activations
    w = qw.dequantize()
    g = torch.Generator().manual_seed(1)
    for M in (1, 2, 3, 4, 7, GEMM_MIN_ROWS - 1):
        x = torch.randn(M, in_features, generator=g) * torch.rand(1, in_features, generator=g) * 4
        bias = torch.randn(OUT_FEATURES, generator=g) if M % 2 else None
        assert_close_to(linear(x, prepared, bias), round_activations(x, activations), w, bias)


@pytest.mark.parametrize("fmt", FORMATS)
def test_many_rows_use_the_exact_weights(fmt):
    qw = random_weight(QuantScheme(**FORMATS[fmt], group_size=64), (OUT_FEATURES, 192), seed=2)
    prepared = prepare(qw, activations="int16")
    eye = torch.eye(192)
    assert torch.equal(linear(eye, prepared, None), qw.dequantize().T)  # one-hot rows read each weight back


def test_zero_rows_of_x_and_zero_scales():
    qw = random_weight(QuantScheme(bits=4, group_size=64, symmetric=False), (OUT_FEATURES, 128), seed=3,
                       scale_range=(0.0, 0.0))
    x = torch.randn(2, 128)
    x[0] = 0
    y = linear(x, prepare(qw, activations="int8"), None)
    assert torch.equal(y, torch.zeros_like(y))


def test_widths_without_whole_blocks_keep_float32_activations():
    qw = random_weight(QuantScheme(bits=8, granularity="channel"), (OUT_FEATURES, 77))
    assert prepare(qw, activations="int8").activations == "float32"
    assert int8_activations_reason(QuantScheme(bits=4, group_size=32)) is not None
    assert int8_activations_reason(QuantScheme(format="nf4", bits=4, group_size=64)) is not None


def test_stacked_layouts_compute_each_product():
    layers = [random_weight(QuantScheme(bits=4, group_size=64, symmetric=False), (n, 128), seed=n) for n in (64, 32, 47)]
    for activations in ("float32", "int8", "int16"):
        parts = [prepare(qw, activations=activations) for qw in layers]
        stacked = concatenate(parts)
        x = torch.randn(1, 128)
        torch.testing.assert_close(linear(x, stacked, None), torch.cat([linear(x, p, None) for p in parts], dim=1),
                                   rtol=0, atol=0)
    assert concatenate([prepare(layers[0]), prepare(layers[1], activations="int8")]) is None


def test_int16_activations_are_about_256_times_closer_than_int8():
    qw = random_weight(QuantScheme(bits=4, group_size=64, symmetric=False), (OUT_FEATURES, 256), seed=4)
    x = torch.randn(1, 256)
    exact = F.linear(x, qw.dequantize())
    error = {a: (linear(x, prepare(qw, activations=a), None) - exact).abs().max() for a in ("int8", "int16")}
    assert error["int16"] * 50 < error["int8"]


@pytest.mark.real_model
@pytest.mark.parametrize("activations", ["int8", "int16"])
def test_a_real_smollm2_layer(activations):
    from safetensors import safe_open

    from lowbit.methods.rtn import quantize_rtn
    from lowbit.sources import pull

    with safe_open(str(pull("smollm2-135m", progress=False) / "model.safetensors"), "pt") as f:
        weight = f.get_tensor("model.layers.3.mlp.down_proj.weight").float()
    qw = quantize_rtn(weight, QuantScheme(bits=4, group_size=64, symmetric=False))
    x = torch.randn(3, weight.shape[1], generator=torch.Generator().manual_seed(5))
    assert_close_to(linear(x, prepare(qw, activations=activations), None), round_activations(x, activations),
                    qw.dequantize(), None)


def test_the_shape_function_gives_the_real_output_width():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lowbit.kernels.cpu import bind

    qw = random_weight(QuantScheme(bits=4, group_size=64), (OUT_FEATURES, 128))  # 37 rows: a padded panel
    product = bind(prepare(qw, activations="int16"), None)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        y = product(mode.from_tensor(torch.randn(3, 128)))
    assert tuple(y.shape) == (3, OUT_FEATURES)

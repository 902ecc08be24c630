"""Fake quantization: the same value as the storage path bit for bit, and the gradients the STE and LSQ
define (identity inside the grid's range, zero outside; LSQ's step gradient against a finite difference)."""

from __future__ import annotations

import pytest
import torch

from lowbit.act_scheme import ActScheme, quantize_activation
from lowbit.formats import FormatName
from lowbit.formats.codebook import nearest_codes
from lowbit.methods.rtn import quantize_rtn
from lowbit.qweight import QuantizedWeight
from lowbit.scheme import Granularity, QuantScheme, ZeroPoint
from lowbit.train.fake_quant import (
    FakeQuantParams,
    check_trainable,
    fake_quantize,
    fake_quantize_activation,
    to_quantized,
)

GRID_SCHEMES = [
    QuantScheme(bits=4, group_size=64, symmetric=False),
    QuantScheme(bits=3, group_size=64, symmetric=False),
    QuantScheme(bits=2, group_size=32, symmetric=False, zero_point=ZeroPoint.FLOAT),
    QuantScheme(bits=4, granularity=Granularity.CHANNEL),
    QuantScheme(bits=8, granularity=Granularity.TENSOR),
    QuantScheme(format=FormatName.NF4, bits=4, group_size=64),
    QuantScheme(format=FormatName.FP4, bits=4, group_size=32),
    QuantScheme(format=FormatName.FP8_E4M3, bits=8, granularity=Granularity.CHANNEL),
    QuantScheme(format=FormatName.FP8_E5M2, bits=8, group_size=128),
    QuantScheme(format=FormatName.TERNARY, bits=2, group_size=64),
]


def _weight(seed: int = 0, shape=(256, 512)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 0.05


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


@pytest.mark.parametrize("scheme", GRID_SCHEMES, ids=lambda s: s.describe())
def test_fake_quant_equals_dequantize_of_the_storage_encoder(scheme):
    w = _weight()
    stored = quantize_rtn(w, scheme)
    fake, _ = fake_quantize(w, FakeQuantParams.from_quantized(stored), scheme)
    assert torch.equal(_bits(fake), _bits(stored.dequantize()))


def _codebook_weight(scheme: QuantScheme, w: torch.Tensor) -> QuantizedWeight:
    rows = w.shape[0] * (w.shape[1] // scheme.group_size)
    g = torch.Generator().manual_seed(1)
    shape = (rows, 2**scheme.bits) + ((scheme.vector_dim,) if scheme.vector_dim else ())
    codebook = (torch.randn(shape, generator=g) * 0.05).half()
    if scheme.vector_dim is None:
        codebook = codebook.sort(dim=1).values
    codes = nearest_codes(w.reshape(rows, -1), codebook.float()).reshape(w.shape[0], -1)
    return QuantizedWeight.from_codebook(codes, codebook, scheme)


@pytest.mark.parametrize("scheme", [
    QuantScheme(format=FormatName.LUT, bits=3, group_size=64),
    QuantScheme(format=FormatName.VQ, bits=5, group_size=64, vector_dim=2),
], ids=lambda s: s.describe())
def test_codebook_fake_quant_equals_dequantize(scheme):
    w = _weight()
    stored = _codebook_weight(scheme, w)
    fake, codes = fake_quantize(w, FakeQuantParams.from_quantized(stored), scheme)
    assert torch.equal(_bits(fake), _bits(stored.dequantize()))
    assert torch.equal(codes.reshape(w.shape[0], -1), stored.codes())


@pytest.mark.parametrize("scheme", GRID_SCHEMES + [
    QuantScheme(bits=4, group_size=64, double_quant=True),
    QuantScheme(format=FormatName.NF4, bits=4, group_size=64, double_quant=True),
    QuantScheme(format=FormatName.LUT, bits=3, group_size=64),
], ids=lambda s: s.describe())
def test_conversion_is_exact_after_the_parameters_moved(scheme):
    """After a training step moved weights, scales and zero-points off their stored values, the converted
    weight decodes to exactly what the forward computed, with the same codes."""
    w = _weight()
    start = _codebook_weight(scheme, w) if scheme.is_codebook else quantize_rtn(w, scheme)
    params = FakeQuantParams.from_quantized(start)
    g = torch.Generator().manual_seed(2)
    w = w + torch.randn(w.shape, generator=g) * 0.01
    for name in ("scale", "zero", "codebook"):
        t = getattr(params, name)
        if t is not None:
            setattr(params, name, t * (1 + 0.03 * torch.randn(t.shape, generator=g)) + 1e-4 * torch.rand(t.shape, generator=g))
    fake, codes = fake_quantize(w, params, scheme)
    converted = to_quantized(w, params, scheme)
    assert torch.equal(_bits(fake), _bits(converted.dequantize()))
    assert torch.equal(converted.codes(), codes.reshape(w.shape[0], -1))
    frozen, _ = fake_quantize(torch.zeros_like(w), params, scheme, codes=codes)  # E2E: codes kept, weight unused
    assert torch.equal(_bits(frozen), _bits(fake))


def test_ste_gradient_is_identity_inside_the_range_and_zero_outside():
    scheme = QuantScheme(bits=4, granularity=Granularity.TENSOR)
    params = FakeQuantParams(scale=torch.tensor([[0.1]]))
    w = torch.tensor([[-2.0, -0.79, -0.31, 0.0, 0.26, 0.69, 0.75, 3.0]], requires_grad=True)  # grid -0.8..0.7
    fake, _ = fake_quantize(w, params, scheme)
    fake.backward(torch.ones_like(fake))
    assert w.grad.tolist() == [[0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]]


def test_lsq_step_gradient_matches_a_finite_difference_of_the_surrogate():
    """LSQ's eq. 3: d w'/d s = round(w/s) - w/s inside the range, the clip level outside, scaled by
    1/sqrt(n Q_p). Checked against a central difference of the function LSQ differentiates, s*clamp(w/s)
    with the rounding held fixed."""
    scheme = QuantScheme(bits=4, granularity=Granularity.TENSOR)
    w = torch.tensor([[-2.0, -0.43, -0.07, 0.12, 0.33, 0.52, 1.5, 0.91]], dtype=torch.float64)
    s0 = 0.125  # a float16 value: the stored rounding does not move it
    scale = torch.tensor([[s0]], requires_grad=True)
    fake, _ = fake_quantize(w.float(), FakeQuantParams(scale=scale), scheme)
    fake.sum().backward()
    q = torch.round(w / s0).clamp(-8, 7)

    def surrogate(s: float) -> torch.Tensor:  # rounding residual frozen at s0
        x = w / s
        inside = (x >= -8) & (x <= 7)
        return torch.where(inside, s * (x + (q - w / s0)), s * q).sum()

    h = 1e-6
    numeric = (surrogate(s0 + h) - surrogate(s0 - h)) / (2 * h)
    n, qp = w.numel(), 7
    assert scale.grad.item() == pytest.approx(numeric.item() / (n * qp) ** 0.5, rel=1e-4)


def test_schemes_without_a_trainer_are_refused_in_one_line():
    with pytest.raises(ValueError, match="cannot fake-quantize"):
        check_trainable(QuantScheme(bits=4, group_size=32, symmetric=False, zero_point=ZeroPoint.FLOAT,
                                    super_group=8, sub_scale_bits=6))


@pytest.mark.parametrize("act", [ActScheme(dynamic=False, granularity="tensor"), ActScheme(),
                                 ActScheme(format="fp8_e4m3", dynamic=False, granularity="tensor"),
                                 ActScheme(dynamic=True, granularity="tensor")], ids=lambda a: a.describe())
def test_activation_fake_quant_uses_the_8bit_layers_codes_and_scale(act):
    x = torch.randn(3, 5, 256, generator=torch.Generator().manual_seed(1)) * 2
    static = None if act.dynamic else torch.tensor(0.03)
    codes, scale = quantize_activation(x.reshape(-1, 256), act, static)
    fake = fake_quantize_activation(x, act, static)
    assert torch.equal(fake.reshape(-1, 256), codes.float() * scale)


def test_activation_ste_and_lsq_gradient_of_a_static_input_scale():
    act = ActScheme(dynamic=False, granularity="tensor")
    s0 = 0.01
    x = torch.tensor([[-2.0, -1.0, -0.333, 0.004, 0.5, 1.26, 1.4]], dtype=torch.float64)  # range -1.28..1.27
    xs = x.float().clone().requires_grad_(True)
    scale = torch.tensor(s0, requires_grad=True)
    fake_quantize_activation(xs, act, scale).sum().backward()
    inside = (x / s0 >= -128) & (x / s0 <= 127)
    assert xs.grad.tolist() == inside.float().tolist()
    q = torch.round(x / s0).clamp(-128, 127)
    expected = torch.where(inside, q - x / s0, q).sum() / (x.numel() * 127) ** 0.5  # LSQ eq. 3, scaled
    assert scale.grad.item() == pytest.approx(expected.item(), rel=1e-4)

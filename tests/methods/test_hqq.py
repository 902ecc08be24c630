"""HQQ against RTN on the same heavy-tailed weight: lower error where it optimises, never higher."""

import pytest
import torch

from lowbit.methods import get_method
from lowbit.methods.hqq import HQQConfig, lp_error, optimize_int_scale, optimize_zero, quantize_hqq
from lowbit.methods.rtn import quantize_rtn
from lowbit.quantizer import dequantize_rows, qparams, quantize_rows, weight_rows
from lowbit.scheme import QuantScheme


def heavy_tailed(out=128, inp=256, seed=0):
    torch.manual_seed(seed)  # StudentT samples from the global generator
    return torch.distributions.StudentT(3.0).sample((out, inp)) * 0.02


def errors(w, qw):
    """(squared error, HQQ's lp objective with p = 0.7) of a quantized weight."""
    back = qw.dequantize()
    return (back - w).pow(2).sum().item(), lp_error(w, back, 0.7).sum().item()


ASYM = [
    QuantScheme(bits=4, group_size=64, symmetric=False, zero_point="float"),
    QuantScheme(bits=3, group_size=64, symmetric=False, zero_point="int"),
    QuantScheme(bits=2, group_size=32, symmetric=False, zero_point="int"),
    QuantScheme(bits=2, group_size=32, symmetric=False, zero_point="float"),
]
SYM = [QuantScheme(bits=4, group_size=64), QuantScheme(format="nf4", group_size=64),
       QuantScheme(format="fp4", group_size=64, observer="mse")]


def ids(s):
    return s.describe().replace(" ", "-")


@pytest.mark.parametrize("scheme", ASYM, ids=ids)
def test_asymmetric_beats_rtn_on_squared_and_lp_error(scheme):
    w = heavy_tailed()
    rtn_sq, rtn_lp = errors(w, quantize_rtn(w, scheme))
    hqq_sq, hqq_lp = errors(w, quantize_hqq(w, scheme))
    assert hqq_lp < 0.99 * rtn_lp
    assert hqq_sq < 0.99 * rtn_sq


@pytest.mark.parametrize("scheme", SYM, ids=ids)
def test_symmetric_is_never_worse_than_rtn_in_any_row(scheme):
    w = heavy_tailed()
    rows = weight_rows(w, scheme)
    rtn = (quantize_rtn(w, scheme).dequantize().reshape(rows.shape) - rows).pow(2).sum(1)
    hqq = (quantize_hqq(w, scheme).dequantize().reshape(rows.shape) - rows).pow(2).sum(1)
    assert torch.all(hqq <= rtn)
    assert hqq.sum() < rtn.sum()


@pytest.mark.parametrize("scheme", [ASYM[0], ASYM[1], SYM[0]], ids=ids)
def test_no_iterations_is_rtn(scheme):
    w = heavy_tailed()
    a, b = quantize_hqq(w, scheme, config=HQQConfig(iters=0)), quantize_rtn(w, scheme)
    assert torch.equal(a.qdata, b.qdata) and torch.equal(a.scale, b.scale)


@pytest.mark.parametrize("scheme", [*ASYM, *SYM], ids=ids)
def test_stored_weight_is_what_the_optimiser_chose(scheme):
    w = heavy_tailed()
    qw = quantize_hqq(w, scheme)
    rows = weight_rows(w, scheme)
    scale = qw.scales().reshape(-1)
    zero = None if qw.zeros() is None else qw.zeros().reshape(-1)
    fmt = scheme.number_format()
    codes = quantize_rows(rows, scale, zero, fmt, scheme)  # the codes are optimal for the stored scale/zero
    assert torch.equal(codes.reshape(w.shape), qw.codes())
    assert torch.equal(dequantize_rows(codes, scale, zero, fmt, scheme).reshape(w.shape), qw.dequantize())


def test_deterministic_and_registered():
    w = heavy_tailed()
    s = ASYM[1]
    a, b = quantize_hqq(w, s), get_method("hqq").quantize(w.clone(), s)
    assert torch.equal(a.qdata, b.qdata) and torch.equal(a.scale, b.scale) and torch.equal(a.zero, b.zero)


def test_zero_and_constant_rows_survive():
    w = torch.zeros(4, 64)
    w[1] = 0.5
    for scheme in (QuantScheme(bits=4, group_size=32), ASYM[0], ASYM[1]):
        back = quantize_hqq(w, scheme).dequantize()
        torch.testing.assert_close(back, w, rtol=0, atol=2e-3)


def test_nan_weights_are_refused_as_rtn_refuses_them():
    w = heavy_tailed()
    w[3, 7] = float("nan")
    with pytest.raises(ValueError, match="layers.0.q_proj has 1 NaN/Inf") as hqq_err:
        quantize_hqq(w, ASYM[0], layer="layers.0.q_proj")
    with pytest.raises(ValueError) as rtn_err:
        quantize_rtn(w, ASYM[0], layer="layers.0.q_proj")
    assert str(hqq_err.value) == str(rtn_err.value)


@pytest.mark.parametrize("kwargs,match", [({"lp_norm": 1.5}, "lp_norm must be in"), ({"beta": 0.0}, "beta must be"),
                                          ({"kappa": 0.5}, "kappa must be"), ({"iters": -1}, "iters must be")])
def test_bad_config_is_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HQQConfig(**kwargs)


def test_stored_zero_and_scale_are_the_optimised_ones():
    w = heavy_tailed()
    for scheme in ASYM[:2]:
        fmt = scheme.number_format()
        rows = weight_rows(w, scheme)
        scale, zero = qparams(rows.min(1).values.clamp(max=0), rows.max(1).values.clamp(min=0), fmt, scheme)
        zero = optimize_zero(rows, scale, zero, fmt, scheme, HQQConfig())
        if scheme.zero_point.value == "int":
            scale = optimize_int_scale(rows, scale, zero, fmt, scheme, HQQConfig())
        qw = quantize_hqq(w, scheme)
        assert torch.equal(qw.scales().reshape(-1), scale) and torch.equal(qw.zeros().reshape(-1), zero)

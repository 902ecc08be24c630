"""RTN error bounds from the definition of rounding, for every format and granularity."""

import pytest
import torch

from lowbit.methods import get_method
from lowbit.methods.rtn import quantize_rtn
from lowbit.quantizer import rows_shape, weight_rows
from lowbit.scheme import QuantScheme


def weight(out=256, inp=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, inp, generator=g) * 0.02


INT_SCHEMES = [
    QuantScheme(bits=b, granularity=gran, group_size=gs, symmetric=sym, zero_point=zp)
    for b in (2, 3, 4, 8)
    for gran, gs in (("tensor", None), ("channel", None), ("group", 64), ("group", 32))
    for sym, zp in ((True, "int"), (False, "int"), (False, "float"))
]


@pytest.mark.parametrize("scheme", INT_SCHEMES, ids=lambda s: s.describe().replace(" ", "-"))
def test_int_minmax_error_is_at_most_half_a_step(scheme):
    w = weight()
    qw = quantize_rtn(w, scheme)
    err = (qw.dequantize() - w).abs()
    R, G = rows_shape(tuple(w.shape), scheme)
    step = qw.scales().reshape(R * G, 1)
    rows_err = err.reshape(R * G, -1)
    # Half a step. An integer zero-point is itself rounded, which shifts the grid by up to half a
    # step, so the extremes of an asymmetric row may be clamped by up to a whole step. Float16
    # rounding of the scale (and of a float minimum) adds a little over the whole code range; a
    # symmetric row's positive extreme sits exactly half a step above the top code (7.5 -> 7).
    int_zero = not scheme.symmetric and scheme.zero_point.value == "int"
    bound = step if int_zero else step / 2
    slack = 1e-3 * step * 2**scheme.bits
    assert torch.all(rows_err <= bound + slack)
    if int_zero:  # ... but only at the ends: most weights are within half a step
        assert (rows_err > step / 2 + slack).float().mean() < 0.01


@pytest.mark.parametrize("fmt,bits", [("nf4", 4), ("fp4", 4), ("fp8_e4m3", 8), ("fp8_e5m2", 8)])
@pytest.mark.parametrize("gran,gs", [("channel", None), ("group", 64)])
def test_table_formats_round_to_the_nearest_scaled_grid_point(fmt, bits, gran, gs):
    scheme = QuantScheme(format=fmt, bits=bits, granularity=gran, group_size=gs)
    w = weight()
    qw = quantize_rtn(w, scheme)
    grid = scheme.number_format().decode(torch.arange(2**bits, dtype=torch.uint8))
    grid = grid[torch.isfinite(grid)]
    rows = weight_rows(w, scheme)
    scale = qw.scales().reshape(-1, 1)
    best = ((rows[..., None] - grid * scale[..., None]).abs()).amin(-1)
    got = (qw.dequantize().reshape(rows.shape) - rows).abs()
    assert torch.all(got <= best + 1e-6 * scale)


def test_bits_per_weight_counts_codes_scales_and_zeros():
    w = weight()
    assert quantize_rtn(w, QuantScheme(bits=4, group_size=64)).bits_per_weight == 4 + 16 / 64
    assert quantize_rtn(w, QuantScheme(bits=4, group_size=64, symmetric=False)).bits_per_weight == 4 + 16 / 64 + 4 / 64
    fmin = QuantScheme(bits=3, group_size=64, symmetric=False, zero_point="float")
    assert quantize_rtn(w, fmin).bits_per_weight == 3 + 32 / 64
    assert quantize_rtn(w, QuantScheme(bits=8, granularity="channel")).bits_per_weight == 8 + 16 / 512
    nf4_dq = quantize_rtn(w, QuantScheme(format="nf4", group_size=64, double_quant=True))
    n_scales = 256 * 512 // 64
    assert nf4_dq.storage_bits() == 256 * 512 * 4 + n_scales * 8 + (-(-n_scales // 256)) * 32 + 32


def test_more_bits_less_error_and_observers_that_clip_help_heavy_tails():
    torch.manual_seed(1)  # StudentT samples from the global generator
    w = torch.distributions.StudentT(2.0).sample((256, 512)) * 0.02
    errs = [(quantize_rtn(w, QuantScheme(bits=b, granularity="channel")).dequantize() - w).pow(2).mean()
            for b in (2, 3, 4, 8)]
    assert errs == sorted(errs, reverse=True)
    minmax = (quantize_rtn(w, QuantScheme(bits=3, granularity="channel")).dequantize() - w).pow(2).mean()
    mse = (quantize_rtn(w, QuantScheme(bits=3, granularity="channel", observer="mse")).dequantize() - w).pow(2).mean()
    assert mse < minmax


def test_zero_rows_and_constant_rows_survive():
    w = torch.zeros(4, 64)
    w[1] = 0.5
    for scheme in (QuantScheme(bits=4, group_size=32), QuantScheme(bits=4, group_size=32, symmetric=False),
                   QuantScheme(format="nf4", group_size=32, double_quant=True)):
        back = quantize_rtn(w, scheme).dequantize()
        assert torch.isfinite(back).all()
        # The symmetric int grid maps 0.5 to 7.5 steps and rounds it to the top code, 7: half a step off.
        atol = 0.5 / 15 + 1e-3 if scheme.format.value == "int" and scheme.symmetric else 2e-3
        torch.testing.assert_close(back, w, rtol=0, atol=atol)


def test_deterministic():
    w = weight()
    s = QuantScheme(bits=3, group_size=32, observer="mse")
    a, b = quantize_rtn(w, s), quantize_rtn(w.clone(), s)
    assert torch.equal(a.qdata, b.qdata) and torch.equal(a.scale, b.scale)


def test_bad_input_is_named():
    w = weight()
    w[3, 7] = float("nan")
    with pytest.raises(ValueError, match="layers.0.q_proj has 1 NaN/Inf"):
        quantize_rtn(w, QuantScheme(), layer="layers.0.q_proj")
    with pytest.raises(ValueError, match="group size 100 does not divide in_features=512"):
        quantize_rtn(weight(), QuantScheme(group_size=100))
    with pytest.raises(ValueError, match="unknown method .gptqq.; available methods: awq, gptq, hqq, pq, rtn, squeezellm, vq"):
        get_method("gptqq")

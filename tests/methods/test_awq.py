"""AWQ's two searches on single layers with planted salient input channels."""

import pytest
import torch

from lowbit.methods.awq import AWQConfig, awq_quantize, fake_quantize, output_error, search_scales
from lowbit.methods.gptq import accumulate_hessian
from lowbit.methods.rtn import quantize_rtn
from lowbit.scheme import QuantScheme

SCHEMES = {
    "int4-channel": QuantScheme(bits=4, granularity="channel"),
    "int3-g64-asym": QuantScheme(bits=3, group_size=64, symmetric=False),
    "nf4-g64": QuantScheme(format="nf4", group_size=64),
    "int4-tensor": QuantScheme(bits=4, granularity="tensor"),
}


def salient_layer(out=96, inp=256, samples=2048, seed=0):
    """Inputs where 8 channels are 30x larger than the rest (LLM activation outliers)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(samples, inp, generator=g)
    X[:, :8] *= 30.0
    W = torch.randn(out, inp, generator=g) * 0.02
    H, _ = accumulate_hessian(None, X, 0)
    return W, X, H, X.abs().mean(0)


@pytest.fixture(scope="module")
def layer():
    return salient_layer()


def total_error(W, Wq, H):
    return float(output_error(Wq - W, H).sum())


@pytest.mark.parametrize("scheme", SCHEMES.values(), ids=SCHEMES.keys())
def test_scales_protect_salient_channels(layer, scheme):
    W, _, H, x_mean = layer
    found = search_scales([W], H, x_mean, scheme)
    rtn = total_error(W, fake_quantize(W, scheme), H)
    assert found.error_unscaled == pytest.approx(rtn, rel=1e-5)
    assert found.exponent is not None and found.exponent > 0
    assert found.scale[:8].min() > found.scale[8:].max(), "the salient channels get the largest scales"
    scaled = fake_quantize(W * found.scale, scheme) / found.scale
    assert total_error(W, scaled, H) == pytest.approx(found.error, rel=1e-4)
    assert found.error < 0.8 * rtn


def test_scale_search_never_loses_to_plain_rounding():
    """White inputs give nothing to protect: the identity is kept when no exponent helps."""
    g = torch.Generator().manual_seed(1)
    W = torch.randn(64, 128, generator=g) * 0.02
    H = 2 * torch.eye(128)
    for scheme in SCHEMES.values():
        found = search_scales([W], H, torch.ones(128), scheme)
        assert found.error <= found.error_unscaled
        if found.exponent is None:
            assert torch.equal(found.scale, torch.ones(128))


def test_scales_are_searched_for_all_linears_of_a_shared_input(layer):
    W, _, H, x_mean = layer
    scheme = SCHEMES["int4-channel"]
    found = search_scales([W[:32], W[32:]], H, x_mean, scheme)
    expected = sum(total_error(w, fake_quantize(w * found.scale, scheme) / found.scale, H) for w in (W[:32], W[32:]))
    assert found.error == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("scheme", SCHEMES.values(), ids=SCHEMES.keys())
def test_clipping_search_never_loses_to_rtn_on_any_row(layer, scheme):
    W, _, H, _ = layer
    clipped, rtn = awq_quantize(W, H, scheme), quantize_rtn(W, scheme)
    if scheme.granularity.value == "tensor":
        assert total_error(W, clipped.dequantize(), H) <= total_error(W, rtn.dequantize(), H) * (1 + 1e-5)
        return
    # Per row (group) on the diagonal blocks of H, which is what the search minimises.
    G = W.shape[1] // (scheme.group_size or W.shape[1])
    g = W.shape[1] // G
    for k in range(G):
        cols = slice(k * g, (k + 1) * g)
        Hk = H[cols, cols]
        e_clip = output_error(clipped.dequantize()[:, cols] - W[:, cols], Hk)
        e_rtn = output_error(rtn.dequantize()[:, cols] - W[:, cols], Hk)
        assert (e_clip <= e_rtn * (1 + 1e-5) + 1e-12).all()


def test_no_clipping_is_rtn_and_results_are_deterministic(layer):
    W, _, H, _ = layer
    scheme = SCHEMES["int3-g64-asym"]
    assert torch.equal(awq_quantize(W, H, scheme, AWQConfig(clip=False)).codes(), quantize_rtn(W, scheme).codes())
    assert torch.equal(awq_quantize(W, H, scheme).qdata, awq_quantize(W.clone(), H.clone(), scheme).qdata)


@pytest.mark.parametrize("kwargs, match", [({"grid": 0}, "grid must be an int >= 1"),
                                           ({"clip_grid": 0}, "clip_grid must be an int >= 1"),
                                           ({"max_shrink": 1.0}, r"max_shrink must be in \[0, 1\)")])
def test_bad_config_is_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AWQConfig(**kwargs)


def test_bad_inputs_are_named(layer):
    W, _, H, _ = layer
    bad = W.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="fc has 1 NaN/Inf values"):
        awq_quantize(bad, H, SCHEMES["int4-channel"], layer="fc")
    with pytest.raises(ValueError, match=r"Hessian of fc must be \[256, 256\]"):
        awq_quantize(W, H[:8, :8], SCHEMES["int4-channel"], layer="fc")

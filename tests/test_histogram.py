"""Streaming histograms and the activation observers on them: golden cases whose answer is known."""

from __future__ import annotations

import pytest
import torch

from lowbit.act_scheme import ActScheme
from lowbit.histogram import AbsHistogram
from lowbit.observers import observe_range

INT8 = ActScheme(dynamic=False, granularity="tensor")


def _threshold(hist: AbsHistogram, observer: str, **kw) -> float:
    return hist.threshold(observer, fake_quant=INT8.fake_quant, **kw)


def test_growing_range_keeps_every_count_in_its_bin():
    """Batches with growing maxima force appends and pair merges; the result equals one histogram
    of all values at the final bin width."""
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(1000, generator=g) * s for s in (0.01, 1.0, 30.0, 1000.0)]
    hist = AbsHistogram(bins=64)
    for b in batches:
        hist.update(b)
    assert 64 <= hist.counts.numel() <= 128
    allv = torch.cat(batches).abs()
    ref = torch.bincount((allv / hist.width).floor().long(), minlength=hist.counts.numel()).double()
    assert torch.equal(hist.counts, ref[:hist.counts.numel()])
    assert hist.total == 4000 and hist.amax == float(allv.max())


def test_minmax_and_percentile():
    hist = AbsHistogram()
    hist.update(torch.arange(1, 10001, dtype=torch.float32))  # |x| uniform on 1..10000
    assert _threshold(hist, "minmax") == 10000.0
    assert _threshold(hist, "percentile", percentile=99.0) == pytest.approx(9900, rel=2e-3)
    assert _threshold(hist, "percentile", percentile=100.0) == pytest.approx(10000, rel=1e-3)


def test_mse_clips_a_lone_outlier_and_keeps_a_uniform_range():
    g = torch.Generator().manual_seed(1)
    uniform = torch.rand(100_000, generator=g) * 2 - 1
    hist = AbsHistogram()
    hist.update(uniform)
    assert _threshold(hist, "mse") == pytest.approx(float(uniform.abs().max()), rel=0.02)
    with_outlier = AbsHistogram()
    with_outlier.update(torch.cat([torch.randn(1_000_000, generator=g), torch.tensor([100.0])]))
    # clipping one value at 100 to ~5 costs ~9e3; rounding 1e6 Gaussians on a 100/127 step ~5e4
    assert _threshold(with_outlier, "mse") < 20


def test_kl_agrees_with_the_in_memory_observer():
    """On data whose histogram the streaming version builds exactly (one batch, 2048 bins over
    [0, amax]), the KL threshold equals ``observe_range``'s TensorRT entropy calibration."""
    g = torch.Generator().manual_seed(2)
    x = torch.cat([torch.randn(200_000, generator=g), torch.randn(20, generator=g) * 40])
    hist = AbsHistogram(bins=2048)
    hist.update(x)
    _, hi = observe_range(x.reshape(1, -1), "kl", symmetric=True, fake_quant=None, levels=256)
    assert _threshold(hist, "kl", levels=256) == pytest.approx(float(hi[0]), rel=1e-3)
    assert _threshold(hist, "kl", levels=256) < 0.5 * hist.amax  # the tail outliers are clipped


def test_bad_inputs():
    hist = AbsHistogram()
    with pytest.raises(ValueError, match="no activations"):
        _threshold(hist, "minmax")
    with pytest.raises(ValueError, match="NaN/Inf"):
        hist.update(torch.tensor([1.0, float("inf")]))
    hist.update(torch.zeros(10))
    assert _threshold(hist, "kl") == 0.0

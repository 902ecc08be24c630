"""Tests for lowbit.observers: golden values, reference KL search, error floors, error messages."""

import math

import numpy as np
import pytest
import torch

import lowbit.observers as obs
from lowbit.observers import Observer, kl_num_bins, observe_range


def int4_fake_quant(symmetric: bool):
    """Round-to-nearest int4 quantize-dequantize per row (the caller-side contract of FakeQuant)."""

    def fake_quant(x, lo, hi):
        if symmetric:  # grid -8..7, scale from max(|lo|, hi) over the 7 positive steps
            scale = (torch.maximum(lo.abs(), hi) / 7).clamp(min=1e-12)[:, None]
            return torch.clamp(torch.round(x / scale), -8, 7) * scale
        scale = ((hi - lo) / 15).clamp(min=1e-12)[:, None]  # grid 0..15 with zero point
        zero = torch.round(-lo[:, None] / scale)
        return (torch.clamp(torch.round(x / scale) + zero, 0, 15) - zero) * scale

    return fake_quant


def run(x, observer, symmetric=True, levels=16, **kw):
    fake_quant = int4_fake_quant(symmetric)
    return observe_range(x, observer, symmetric=symmetric, fake_quant=fake_quant, levels=levels, **kw)


def sq_err(x, lo, hi, symmetric):
    return ((x - int4_fake_quant(symmetric)(x, lo, hi)) ** 2).sum(1)


# ---- reference entropy calibration: a direct loop over bins, as pytorch-quantization's
# ---- calib/histogram.py _compute_amax_entropy (without its bins[0] = bins[1] ReLU tweak).


def ref_hist(v: torch.Tensor, B: int) -> np.ndarray:
    """Histogram of one row of |x| with B bins over [0, max], binned exactly as the observer does."""
    width = v.max() / B
    idx = (v / width).floor().clamp(0, B - 1).long()
    return np.bincount(idx.numpy(), minlength=B).astype(np.float64)


def ref_kl(hist: np.ndarray, i: int, nq: int) -> float:
    P = hist[:i].copy()
    P[i - 1] += hist[i:].sum()
    group = (np.arange(i) * nq) // i  # np.digitize(range(i), linspace(0, i, nq + 1)) - 1
    Q = np.zeros(i)
    for g in range(nq):
        nonempty = (group == g) & (hist[:i] > 0)
        if nonempty.any():
            Q[nonempty] = hist[:i][nonempty].sum() / nonempty.sum()
    P, Q = P / P.sum(), Q / Q.sum()
    m = P > 0
    return math.inf if np.any(Q[m] == 0) else float(np.sum(P[m] * np.log(P[m] / Q[m])))


def ref_best_bins(hist: np.ndarray, nq: int) -> int:
    kls = np.array([ref_kl(hist, i, nq) for i in range(nq, len(hist) + 1)])
    return nq + int(np.flatnonzero(kls <= kls.min() + 1e-9).max())  # last argmin


def chosen_bins(t: float, amax: float, B: int) -> int:
    """Invert the observer's threshold (i + 0.5) * width, capped at amax."""
    return B if t >= amax else round(t / (amax / B) - 0.5)


# ---- contract, all observers


@pytest.mark.parametrize("observer", list(Observer))
@pytest.mark.parametrize("symmetric", [True, False])
def test_contract(observer, symmetric):
    torch.manual_seed(0)
    x = torch.randn(7, 64, dtype=torch.bfloat16) + 0.5
    x[3] = 0.0  # all-zero row -> (0, 0), the caller guards the zero scale
    x[4] = x[4].abs()  # all-positive row
    lo, hi = run(x, observer, symmetric)
    assert lo.shape == hi.shape == (7,) and lo.dtype == hi.dtype == torch.float32
    assert (lo <= 0).all() and (hi >= 0).all()
    assert lo[3] == 0 and hi[3] == 0
    if symmetric:
        assert torch.equal(lo, -hi)
    else:
        assert lo[4] == 0
    absmax = x.float().abs().amax(1)
    assert (hi <= absmax).all() and (-lo <= absmax).all()


@pytest.mark.parametrize("observer", list(Observer))
def test_single_value_rows(observer):
    x = torch.tensor([[2.0], [-3.0], [0.0]])
    lo, hi = run(x, observer, symmetric=False)
    assert lo.tolist() == [0.0, -3.0, 0.0] and hi.tolist() == [2.0, 0.0, 0.0]


def test_observer_accepts_enum_and_string():
    x = torch.randn(3, 16)
    assert all(torch.equal(a, b) for a, b in zip(run(x, Observer.MSE), run(x, "mse")))


# ---- minmax and percentile


def test_minmax_golden():
    x = torch.tensor([[-1.0, 2.0, 0.5], [3.0, 4.0, 5.0], [-6.0, -2.0, -1.0]])
    lo, hi = run(x, "minmax", symmetric=False)
    assert lo.tolist() == [-1.0, 0.0, -6.0] and hi.tolist() == [2.0, 5.0, 0.0]
    lo, hi = run(x, "minmax", symmetric=True)
    assert hi.tolist() == [2.0, 5.0, 6.0] and lo.tolist() == [-2.0, -5.0, -6.0]


@pytest.mark.parametrize("p", [99.0, 99.99, 100.0, 75.5])
def test_percentile_matches_numpy(p):
    row = np.random.default_rng(0).permutation(np.arange(-500, 501, dtype=np.float32))
    x = torch.from_numpy(np.stack([row, row * 0.5 + 3]))
    lo, hi = run(x, "percentile", symmetric=False, percentile=p)
    np.testing.assert_allclose(hi, np.percentile(x.numpy(), p, axis=1), rtol=1e-6)
    np.testing.assert_allclose(lo, np.minimum(np.percentile(x.numpy(), 100 - p, axis=1), 0), rtol=1e-6)
    lo, hi = run(x, "percentile", symmetric=True, percentile=p)
    np.testing.assert_allclose(hi, np.percentile(np.abs(x.numpy()), p, axis=1), rtol=1e-6)


def test_percentile_in_row_chunks(monkeypatch):
    x = torch.randn(50, 40)
    expected = run(x, "percentile", symmetric=False, percentile=90.0)
    monkeypatch.setattr(obs, "_SORT_CHUNK_ELEMS", 100)  # 2 rows per chunk
    got = run(x, "percentile", symmetric=False, percentile=90.0)
    assert all(torch.equal(a, b) for a, b in zip(expected, got))


# ---- MSE shrink search


@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_clips_a_moderate_outlier(symmetric):
    torch.manual_seed(0)
    x = torch.rand(1, 1000) * 2 - 1
    x[0, 0] = 4.0  # at full range the int4 step is ~0.5, so clipping the one outlier pays off
    lo, hi = run(x, "mse", symmetric)
    # the shrink scales both ends, so the asymmetric range cannot clip 4.0 without clipping -1 too
    assert hi[0] < (2.0 if symmetric else 3.9)
    assert (sq_err(x, lo, hi, symmetric) < sq_err(x, *run(x, "minmax", symmetric), symmetric)).all()


def test_mse_keeps_about_the_full_range_on_uniform_data():
    torch.manual_seed(0)
    x = torch.rand(4, 4096) * 2 - 1
    lo, hi = run(x, "mse", symmetric=True)
    assert (hi > 0.85 * x.abs().amax(1)).all()


@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_never_worse_than_minmax(symmetric):
    torch.manual_seed(1)
    x = torch.randn(64, 128) * torch.rand(64, 1) * 3 + torch.randn(64, 1)
    x[::5, 0] *= 20  # some rows with outliers
    err = sq_err(x, *run(x, "mse", symmetric), symmetric)
    err_minmax = sq_err(x, *run(x, "minmax", symmetric), symmetric)
    assert (err <= err_minmax).all() and (err < err_minmax).any()


def test_mse_shrink_grid():
    """With one step only p = 1 is tried: MSE equals minmax."""
    x = torch.randn(8, 32)
    assert all(torch.equal(a, b) for a, b in zip(run(x, "mse", mse_steps=1), run(x, "minmax")))


# ---- KL (TensorRT entropy calibration)


def test_kl_num_bins_rule():
    assert kl_num_bins(2048, 16, 32) == 128  # int4 groups of 32: 4 bins per value
    assert kl_num_bins(2048, 16, 576) == 2048  # per-channel: the full TensorRT histogram
    assert kl_num_bins(2048, 256, 8) == 256  # never fewer bins than levels


@pytest.mark.parametrize("n", [40, 3000])  # exact per-value candidates / dense candidate grid
def test_kl_matches_reference_search(n):
    torch.manual_seed(2)
    x = torch.distributions.Laplace(0.0, 1.0).sample((4, n))
    x[0, :3] = 30.0
    x[1] = torch.randn(n)
    B, nq = kl_num_bins(256, 16, n), 8
    _, hi = run(x, "kl", symmetric=True, kl_bins=256)
    for r in range(4):
        v = x[r].abs()
        hist = ref_hist(v, B)
        assert chosen_bins(hi[r].item(), v.max().item(), B) == ref_best_bins(hist, nq)


def test_kl_uniform_keeps_the_range():
    x = torch.cat([torch.linspace(-1, 1, 20001)[None], torch.rand(1, 20001) * 2 - 1])
    for levels in (16, 256):
        lo, hi = run(x, "kl", symmetric=True, levels=levels)
        assert (hi > 0.97).all()
        lo, hi = run(x, "kl", symmetric=False, levels=levels)
        assert (hi > 0.97).all() and (lo < -0.97).all()


@pytest.mark.parametrize("dist", ["laplace", "gauss"])
def test_kl_clips_far_outliers_and_lowers_kl(dist):
    torch.manual_seed(3)
    n = 20000
    x = torch.distributions.Laplace(0.0, 1.0).sample((2, n)) if dist == "laplace" else torch.randn(2, n)
    x[:, :4] = 100 * x.abs().amax()  # a few far outliers at 100x the bulk's max
    lo, hi = run(x, "kl", symmetric=True)
    bulk_max = x[:, 4:].abs().amax(1)
    assert (hi < 2 * bulk_max).all() and (hi > 0.1 * bulk_max).all()
    B = kl_num_bins(2048, 16, n)
    for r in range(2):
        v = x[r].abs()
        hist = ref_hist(v, B)
        kl_chosen = ref_kl(hist, chosen_bins(hi[r].item(), v.max().item(), B), 8)
        assert kl_chosen < ref_kl(hist, B, 8)  # i == B is the minmax range
    lo, hi = run(x, "kl", symmetric=False)  # outliers only on the positive side
    assert (hi < 2 * bulk_max).all() and (lo > -2 * bulk_max).all()


def test_kl_chunking_does_not_change_the_result(monkeypatch):
    torch.manual_seed(4)
    x = torch.randn(96, 32)
    expected = run(x, "kl", symmetric=False)
    monkeypatch.setattr(obs, "_KL_CHUNK_BYTES", 20_000)  # several row and candidate chunks
    got = run(x, "kl", symmetric=False)
    assert all(torch.equal(a, b) for a, b in zip(expected, got))


# ---- errors


@pytest.mark.parametrize(
    "x, kw, match",
    [
        (torch.randn(2, 3), {"observer": "max"}, r"unknown observer 'max'.*'minmax', 'percentile', 'mse'"),
        (torch.randn(6), {}, r"2-D.*got \(6,\)"),
        (torch.randn(2, 3, 4), {}, r"2-D"),
        (torch.randn(0, 4), {}, r"empty"),
        (torch.randn(3, 0), {}, r"empty"),
        (torch.tensor([[1.0, math.nan], [math.inf, -math.inf]]), {}, r"non-finite .*NaN/Inf.* in 3 elements"),
        (torch.tensor([[1.0, math.nan], [2.0, 1.0]]), {"observer": "minmax"}, r"non-finite .* in 1 elements"),
        (torch.randn(2, 3), {"observer": "percentile", "percentile": 50.0}, r"must be in \(50, 100\]"),
        (torch.randn(2, 3), {"observer": "percentile", "percentile": 100.5}, r"got 100.5"),
        (torch.randn(2, 3), {"observer": "mse", "mse_steps": 0}, r"mse_steps"),
        (torch.randn(2, 3), {"observer": "mse", "mse_min_shrink": 0.0}, r"mse_min_shrink"),
        (torch.randn(2, 3), {"levels": 1}, r"levels"),
    ],
)
def test_errors(x, kw, match):
    kw = {"observer": "kl", **kw}
    with pytest.raises(ValueError, match=match):
        run(x, kw.pop("observer"), **kw)

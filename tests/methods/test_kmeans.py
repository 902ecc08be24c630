"""Importance-weighted k-means against a brute-force reference on tiny inputs."""

from __future__ import annotations

import itertools

import pytest
import torch

from lowbit.methods.kmeans import assign, objective, update, weighted_kmeans


def _brute_force_best(x: torch.Tensor, w: torch.Tensor, k: int) -> float:
    """The smallest weighted objective over every assignment of the points to ``k`` clusters (each
    cluster's centroid its per-coordinate weighted mean, optimal for that assignment)."""
    codes = torch.tensor(list(itertools.product(range(k), repeat=x.shape[0])))  # every assignment, [L, N]
    xs, ws = x.expand(len(codes), -1, -1), w.expand(len(codes), -1, -1)
    c = update(xs, ws, torch.zeros(len(codes), k, x.shape[1]), codes)
    return float(objective(xs, ws, c, codes).min())


def test_assign_and_update_equal_brute_force():
    g = torch.Generator().manual_seed(1)
    x, w, c = torch.randn(2, 9, 3, generator=g), torch.rand(2, 9, 3, generator=g), torch.randn(2, 4, 3, generator=g)
    codes = assign(x, w, c)
    dist = (w[:, :, None, :] * (x[:, :, None, :] - c[:, None]) ** 2).sum(-1)  # [B, N, k] written out
    assert torch.equal(codes, dist.argmin(-1))
    new = update(x, w, c, codes)
    for b, j, a in itertools.product(range(2), range(4), range(3)):
        members = codes[b] == j
        if members.any():  # the weighted mean minimises sum w (x - c)^2 over c
            expect = (w[b, members, a] * x[b, members, a]).sum() / w[b, members, a].sum()
            assert torch.allclose(new[b, j, a], expect, atol=1e-6)
        else:
            assert new[b, j, a] == c[b, j, a]


def test_well_separated_points_reach_the_brute_force_optimum():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = (centres.repeat_interleave(3, 0) + 0.5 * torch.randn(9, 2, generator=g))
    w = torch.rand(9, 2, generator=g) + 0.1
    c, codes = weighted_kmeans(x[None], w[None], 3, iterations=20, seed=0)
    assert float(objective(x[None], w[None], c, codes)) == pytest.approx(_brute_force_best(x, w, 3), rel=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_objective_never_worse_than_initialisation_and_a_fixed_point(seed):
    g = torch.Generator().manual_seed(10 + seed)
    x, w = torch.randn(3, 8, 2, generator=g), torch.rand(3, 8, 2, generator=g)
    c0, codes0 = weighted_kmeans(x, w, 3, iterations=0, seed=seed)  # k-means++ and its nearest codes
    c, codes = weighted_kmeans(x, w, 3, iterations=50, seed=seed)
    start, end = objective(x, w, c0, codes0), objective(x, w, c, codes)
    assert bool((end <= start + 1e-6).all())
    assert torch.equal(assign(x, w, c), codes)  # Lloyd converged: no step improves further
    assert torch.allclose(update(x, w, c, codes), c, atol=1e-6)
    best = [_brute_force_best(x[b], w[b], 3) for b in range(3)]
    assert all(float(end[b]) >= best[b] - 1e-5 for b in range(3))  # never below the optimum


def test_deterministic_for_a_seed():
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(1, 500, 4, generator=g), torch.rand(1, 500, 4, generator=g)
    a, b = weighted_kmeans(x, w, 16, seed=7), weighted_kmeans(x, w, 16, seed=7)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_bad_arguments_are_refused():
    x = torch.randn(1, 4, 2)
    with pytest.raises(ValueError, match="1 <= k <= N"):
        weighted_kmeans(x, torch.ones(1), 5)
    with pytest.raises(ValueError, match="non-negative"):
        weighted_kmeans(x, -torch.ones(1), 2)

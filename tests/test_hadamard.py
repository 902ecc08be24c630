"""Hadamard matrices and the fast transform: orthogonal, +-1/sqrt(block) entries, transform == matrix product."""

from __future__ import annotations

import pytest
import torch

from lowbit.hadamard import (
    hadamard_block,
    hadamard_matrix,
    hadamard_transform,
    random_hadamard_matrix,
)


@pytest.mark.parametrize(("n", "block"), [(1, 1), (2, 2), (12, 12), (20, 20), (64, 64), (96, 96), (240, 240),
                                          (576, 576), (640, 640), (1536, 1536), (11008, 256), (43, 1)])
def test_hadamard_is_orthogonal_with_equal_magnitude_entries(n, block):
    assert hadamard_block(n) == block
    h = hadamard_matrix(n)
    assert torch.allclose(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    nonzero = h != 0
    assert torch.allclose(h[nonzero].abs(), torch.full_like(h[nonzero], block ** -0.5))
    assert int(nonzero.sum()) == n * block  # block diagonal: each row mixes exactly one block


@pytest.mark.parametrize("n", [12, 64, 576, 1536, 11008])
def test_fast_transform_equals_the_matrix_product(n):
    x = torch.randn(3, 5, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(hadamard_transform(x), x @ hadamard_matrix(n), atol=1e-12)
    assert hadamard_transform(x.float()).dtype == torch.float32


def test_transform_spreads_a_one_channel_outlier():
    x = torch.zeros(1, 1536)
    x[0, 7] = 100.0
    y = hadamard_transform(x)
    assert torch.allclose(y.abs(), torch.full_like(y, 100.0 / 1536 ** 0.5), rtol=1e-5)


def test_random_hadamard_is_orthogonal_and_seeded():
    a, b, c = random_hadamard_matrix(576, 0), random_hadamard_matrix(576, 0), random_hadamard_matrix(576, 1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.allclose(a @ a.T, torch.eye(576, dtype=torch.float64), atol=1e-12)


def test_non_positive_size_is_refused():
    with pytest.raises(ValueError, match="positive size"):
        hadamard_block(0)

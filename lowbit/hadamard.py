"""Orthonormal Hadamard transforms: the rotations that spread activation outliers over all channels.

A Hadamard matrix ``H`` (entries +-1, ``H H^T = n I``) scaled by ``1/sqrt(n)`` is orthogonal, so
``x W^T = (x H)(W H)^T``: rotating a linear's input and its weight by the same ``H`` leaves the
product unchanged while a channel that carries most of a token's magnitude gets shared by all
channels (QuaRot, Ashkboos et al. 2024; QuIP#). Orders here are ``m * 2^k`` with ``m`` a product
of at most two of Paley's orders 12 and 20 (1, 12, 20, 144, 240, 400): Sylvester's doubling for the
power of two, Kronecker products of Paley matrices for the rest (SmolLM2's 576 = 144 * 4 and 1536 =
12 * 128). Other sizes use the largest such block that divides them, block-diagonally: still
orthogonal, mixing within each block only.

``hadamard_transform`` applies the matrix in ``O(n log n)`` (butterflies for the power of two, a
dense ``m x m`` product for the rest), so an online rotation costs a fraction of the linear it feeds.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

# m -> its Paley factors (type I, orders q + 1 for primes q = 3 mod 4); largest m first
_BASES = {400: (20, 20), 240: (12, 20), 144: (12, 12), 20: (20,), 12: (12,), 1: ()}


@functools.cache
def _paley(order: int) -> Tensor:
    """Paley's type-I Hadamard matrix of ``order = q + 1`` (``q`` prime, ``q = 3 mod 4``), float64, unscaled."""
    q = order - 1
    residues = {x * x % q for x in range(1, q)}
    chi = [0] + [1 if x in residues else -1 for x in range(1, q)]
    h = torch.eye(order, dtype=torch.float64)
    h[0, 1:] = 1
    h[1:, 0] = -1
    for i in range(q):
        for j in range(q):
            h[1 + i, 1 + j] += chi[(j - i) % q]
    return h


@functools.cache
def _base(m: int) -> Tensor:
    """The unscaled ``m x m`` Kronecker product of ``m``'s Paley factors."""
    h = torch.ones(1, 1, dtype=torch.float64)
    for order in _BASES[m]:
        h = torch.kron(h, _paley(order))
    return h


def _split(n: int) -> tuple[int, int]:
    """``(m, 2^k)`` of the largest block ``m * 2^k`` dividing ``n``."""
    if n < 1:
        raise ValueError(f"a Hadamard transform needs a positive size, got {n}")
    best = (1, n & -n)  # the largest power of two dividing n
    for m in _BASES:
        if n % m == 0:
            rest = n // m
            if m * (rest & -rest) > best[0] * best[1]:
                best = (m, rest & -rest)
    return best


def hadamard_block(n: int) -> int:
    """The largest order ``m * 2^k`` dividing ``n`` (see the module docstring): the block ``hadamard_transform`` uses."""
    m, power = _split(n)
    return m * power


def hadamard_transform(x: Tensor) -> Tensor:
    """``x @ H`` along the last dimension, ``H`` the orthonormal block-diagonal Hadamard matrix of
    ``x.shape[-1]`` (blocks of ``hadamard_block``). Same dtype as ``x``."""
    n = x.shape[-1]
    m, power = _split(n)
    block = m * power
    lead = x.shape[:-1]
    y = x.reshape(-1, n // block, m, power)
    h = 1
    while h < power:  # Sylvester butterflies: x @ (S (x) S (x) ... ), S = [[1, 1], [1, -1]]
        y = y.reshape(-1, n // block, m, power // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2)
        h *= 2
    y = y.reshape(-1, n // block, m, power)
    if m > 1:  # the (Paley (x) Sylvester) Kronecker product: the Paley factor acts on the middle index
        y = torch.einsum("bgmp,mk->bgkp", y, _base(m).to(y.dtype))
    return (y * block ** -0.5).reshape(*lead, n)


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """The ``[n, n]`` matrix ``hadamard_transform`` multiplies by (``hadamard_transform(x) == x @ H``)."""
    return hadamard_transform(torch.eye(n, dtype=torch.float64)).to(dtype)


def random_hadamard_matrix(n: int, seed: int) -> Tensor:
    """``D H`` in float64: random signs (from ``seed``) times ``hadamard_matrix(n)``; orthogonal.

    The signs make the rotation of a fixed outlier direction look random, which is what spreads it
    (QuaRot's randomized Hadamard); a seed keeps it reproducible.
    """
    generator = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=generator).to(torch.float64) * 2 - 1
    return signs[:, None] * hadamard_matrix(n)

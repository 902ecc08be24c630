"""Orthonormal Hadamard transforms: the rotations that spread activation outliers over all channels.

A Hadamard matrix ``H`` (entries +-1, ``H H^T = n I``) scaled by ``1/sqrt(n)`` is orthogonal, so
``x W^T = (x H)(W H)^T``: rotating a linear's input and its weight by the same ``H`` leaves the
product unchanged while a channel that carries most of a token's magnitude gets shared by all
channels (QuaRot, Ashkboos et al. 2024; QuIP#). Orders here are ``m * 2^k`` with ``m`` a product
of at most two of Paley's orders 12 and 20 (1, 12, 20, 144, 240, 400): Sylvester's doubling for the
power of two, Kronecker products of Paley matrices for the rest (SmolLM2's 576 = 144 * 4 and 1536 =
12 * 128). Other sizes use the largest such block that divides them, block-diagonally: still
orthogonal, mixing within each block only.

``hadamard_transform`` applies the matrix as a few small dense products (one per Kronecker factor),
``O(n (m + 2^k))`` instead of ``O(n^2)``; it is still not free (``bench/matmul8.py``).
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
    ``x.shape[-1]`` (blocks of ``hadamard_block``). Same dtype as ``x``.

    A block ``m * 2^k`` is a Kronecker product of small factors (the Paley part, then powers of two
    of at most 128), so the block's index splits into one axis per factor and each factor is one
    small matrix product along its axis: the sum of the factors' orders in multiply-adds per value
    (140 for 1536 = 12 * 128) instead of the block's order.
    Small dense products run at the CPU's matrix speed; butterflies in torch (one op per stage over
    strided halves) measured 2x slower on SmolLM2's 512 x 1536 ``down_proj`` inputs.
    """
    n = x.shape[-1]
    m, power = _split(n)
    block = m * power
    factors = _factors(m, power)
    y = x.reshape(-1, n)
    after = block
    for i, size in enumerate(factors):
        matrix = _factor(size, paley=i == 0 and m > 1, dtype=x.dtype, device=x.device)
        after //= size
        # the factor's axis between the indices before it and after it: [before, size, after]
        if after == 1:
            y = y.reshape(-1, size) @ matrix
        elif after >= 32:  # a batch of [size, size] @ [size, after] products
            y = torch.matmul(matrix.T, y.reshape(-1, size, after))
        else:  # narrow products are slow: move the axis last instead
            y = (y.reshape(-1, size, after).transpose(1, 2) @ matrix).transpose(1, 2)
    return (y * block ** -0.5).reshape(x.shape)


def _factors(m: int, power: int) -> list[int]:
    """The Kronecker factors of a block ``m * power``: ``m`` (if above 1), then powers of two <= 128."""
    factors = [m] if m > 1 else []
    while power > 1:
        factors.append(min(power, 128))
        power //= factors[-1]
    return factors


@functools.cache
def _factor(size: int, paley: bool, dtype: torch.dtype, device: torch.device) -> Tensor:
    """One unscaled factor: ``_base(size)`` for the Paley part, else Sylvester's matrix of order ``size``."""
    if paley:
        return _base(size).to(dtype=dtype, device=device)
    h = torch.ones(1, 1, dtype=torch.float64)
    sylvester = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    while h.shape[0] < size:
        h = torch.kron(h, sylvester)
    return h.to(dtype=dtype, device=device)


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

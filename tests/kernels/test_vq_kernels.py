"""The ``vq`` kernel against the reference ``F.linear(x, qw.dequantize(), b)``: the weights bit for
bit on one-hot rows (fused and tiled paths), random rows within float32 summation order, under the
AVX-512 gather path and the plain loop the AVX2 variant runs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lowbit.kernels import status
from lowbit.kernels.vq import linear_vq, prepare_vq, supports_vq
from lowbit.nn import QuantLinear, prepare_kernels
from lowbit.qweight import QuantizedWeight, WeightLayout
from lowbit.scheme import QuantScheme

_PROBLEM = status()
pytestmark = pytest.mark.skipif(_PROBLEM is not None, reason=f"lowbit kernels unavailable: {_PROBLEM}")


def vq_weight(bits: int, vector_dim: int, grouping: dict, shape=(37, 160), seed: int = 0) -> QuantizedWeight:
    """Random codes and codebooks of the scheme's shapes (the kernel must only reproduce the lookup)."""
    g = torch.Generator().manual_seed(seed)
    scheme = QuantScheme(format="vq", bits=bits, vector_dim=vector_dim, **grouping)
    layout = WeightLayout(scheme, shape)
    codebook = torch.randn(layout.n_codebooks, 2**bits, vector_dim, generator=g)
    codes = torch.randint(0, 2**bits, (shape[0], shape[1] // vector_dim), dtype=torch.uint8, generator=g)
    return QuantizedWeight.from_codebook(codes, codebook, scheme)


CASES = {  # name -> (bits, vector_dim, grouping, in_features): nibble and byte codes, tails of a unit
    "d1-b4-g32": (4, 1, dict(group_size=32), 160),
    "d2-b4-channel": (4, 2, dict(granularity="channel"), 160),
    "d2-b3-g40": (3, 2, dict(group_size=40), 160),
    "d4-b8-tensor": (8, 4, dict(granularity="tensor"), 168),
    "d8-b4-channel": (4, 8, dict(granularity="channel"), 160),
    # one codebook for every row (per tensor, or per column group: product quantization): dot products
    # of its vectors with x, then lookups (gathers on AVX-512, loads on AVX2)
    "pq-d4-b6-g80": (6, 4, dict(group_size=80, shared_codebook=True), 160),
    "pq-d16-b4-g48": (4, 16, dict(group_size=48, shared_codebook=True), 144),
    "d2-b4-tensor": (4, 2, dict(granularity="tensor"), 160),
    "d1-b2-tensor": (2, 1, dict(granularity="tensor"), 168),
    "d8-b5-tensor": (5, 8, dict(granularity="tensor"), 136),
}


@pytest.mark.parametrize("case", CASES)
def test_vq_kernel_equals_the_reference(isa, case):
    bits, d, grouping, in_features = CASES[case]
    qw = vq_weight(bits, d, grouping, shape=(37, in_features))
    assert supports_vq(qw.scheme) is None
    prepared, w = prepare_vq(qw), qw.dequantize()
    eye = torch.eye(in_features)
    for x in (eye[:1], eye[3:7], eye):  # fused path, then the tiled GEMM path
        assert torch.equal(linear_vq(x, prepared, None), x @ w.T)
    g = torch.Generator().manual_seed(1)
    for M in (1, 3, 5, 30):
        x = torch.randn(M, in_features, generator=g)
        b = torch.randn(37, generator=g)
        got, ref = linear_vq(x, prepared, b), F.linear(x, w, b)
        bound = 64 * torch.finfo(torch.float32).eps * (F.linear(x.abs(), w.abs()) + b.abs())
        assert ((got - ref).abs() <= bound).all(), f"M={M}"


def test_a_sparse_vq_layer_runs_on_the_kernel_table(isa):
    qw = vq_weight(4, 2, dict(granularity="channel"))
    index = torch.tensor([0, 5, 159, 160, 37 * 160 - 1])
    qw = qw.with_outliers(torch.full((5,), 2.5), index)
    layer = QuantLinear.from_quantized(qw, torch.randn(37))
    x = torch.randn(2, 160)
    want = layer(x)  # the reference path
    chosen = prepare_kernels(layer)
    assert layer.kernel_name == "lowbit-cpu-vq", chosen
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)


def test_vector_dims_the_kernel_does_not_tile_say_why():
    assert "vector_dim" in supports_vq(QuantScheme(format="vq", bits=4, vector_dim=3, granularity="channel"))
    assert "vq codes only" in supports_vq(QuantScheme(bits=4))

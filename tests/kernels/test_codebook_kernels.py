"""The CPU kernels for ``lut`` codebooks (a table per scale row or group) and sparse parts, against
the reference ``F.linear(x, qw.dequantize(), b)``: bit for bit on one-hot rows, within float32
summation order on random ones, under both instruction sets."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lowbit.formats.codebook import nearest_codes
from lowbit.kernels import linear, prepare, status, supports
from lowbit.kernels.cpu import bind, concatenate
from lowbit.methods.rtn import quantize_rtn
from lowbit.qweight import QuantizedWeight, WeightLayout
from lowbit.scheme import QuantScheme

_PROBLEM = status()
pytestmark = pytest.mark.skipif(_PROBLEM is not None, reason=f"lowbit kernels unavailable: {_PROBLEM}")

GROUPINGS = {"channel": dict(granularity="channel"), "g64": dict(group_size=64), "tensor": dict(granularity="tensor")}


def lut_weight(bits: int, grouping: str, shape=(37, 192), seed: int = 0, outliers: int = 0) -> QuantizedWeight:
    """Codes and per-row (or per-group) tables from quantiles of each scale row, plus ``outliers``
    random entries of a sparse part (some rows get several, some none)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g)
    scheme = QuantScheme(format="lut", bits=bits, **GROUPINGS[grouping])
    rows = w.reshape(WeightLayout(scheme, shape).n_scale_rows, -1)
    codebook = torch.quantile(rows, torch.linspace(0.02, 0.98, 2**bits), dim=1).T.contiguous()
    qw = QuantizedWeight.from_codebook(nearest_codes(rows, codebook.half()).reshape(shape[0], -1), codebook, scheme)
    if outliers:
        index = torch.randperm(w.numel(), generator=g)[:outliers]
        qw = qw.with_outliers(torch.randn(outliers, generator=g) * 3, index)
    return qw


def assert_matches_reference(qw: QuantizedWeight, rows=(1, 2, 4, 7, 33), bias: bool = True) -> None:
    w, prepared = qw.dequantize(), prepare(qw)
    g = torch.Generator().manual_seed(1)
    N, K = qw.shape
    for M in rows:
        x = torch.randn(M, K, generator=g)
        b = torch.randn(N, generator=g) if bias and M % 2 else None
        got, ref = linear(x, prepared, b), F.linear(x, w, b)
        bound = 64 * torch.finfo(torch.float32).eps * (F.linear(x.abs(), w.abs()) + (0 if b is None else b.abs()))
        assert ((got - ref).abs() - bound).max() <= 0, f"M={M}"


@pytest.mark.parametrize("grouping", GROUPINGS)
@pytest.mark.parametrize("bits", [3, 4])
def test_lut_codebooks_equal_the_reference(isa, bits, grouping):
    qw = lut_weight(bits, grouping)
    assert supports(qw.scheme) is None
    assert_matches_reference(qw)
    eye = torch.eye(qw.shape[1])
    for x in (eye[:1], eye[5:9], eye):  # fused path, then the tiled GEMM path: the weights bit for bit
        assert torch.equal(linear(x, prepare(qw), None), x @ qw.dequantize().T)


@pytest.mark.parametrize("fields", [dict(format="lut", bits=4), dict(format="int", bits=4, group_size=64),
                                    dict(format="int", bits=4, group_size=64, symmetric=False)])
def test_a_sparse_part_is_added_to_the_dense_product(isa, fields):
    if fields["format"] == "lut":
        qw = lut_weight(4, "channel", outliers=300)
    else:
        w = torch.randn(37, 192, generator=torch.Generator().manual_seed(2))
        index = torch.tensor([0, 1, 191, 192, 500, 500 + 191, 36 * 192 + 5])  # row edges and the last row
        qw = quantize_rtn(w, QuantScheme(**fields)).with_outliers(torch.full((index.numel(),), 4.0), index)
    assert qw.scheme.sparse and supports(qw.scheme) is None
    assert_matches_reference(qw)
    eye = torch.eye(qw.shape[1])
    assert torch.equal(linear(eye, prepare(qw), None), qw.dequantize().T)


def test_stacked_lut_and_sparse_layouts_equal_their_parts(isa):
    parts = [lut_weight(4, "channel", shape=(n, 192), seed=s, outliers=o) for n, s, o in ((32, 0, 50), (16, 1, 0),
                                                                                          (24, 2, 9))]
    layouts = [prepare(q) for q in parts]
    stacked = concatenate(layouts)
    assert stacked is not None and stacked.lut.shape == (72, 16)
    x = torch.randn(3, 192, generator=torch.Generator().manual_seed(3))
    want = torch.cat([linear(x, p, None) for p in layouts], dim=1)
    torch.testing.assert_close(linear(x, stacked, None), want, rtol=0, atol=1e-5)
    torch.testing.assert_close(bind(stacked, None)(x), want, rtol=0, atol=1e-5)
    assert concatenate([layouts[0], prepare(lut_weight(3, "channel", shape=(8, 192)))]) is None  # other code width


@pytest.mark.real_model
def test_a_real_smollm2_layer_as_a_lut_codebook_with_outliers():
    from safetensors import safe_open

    from lowbit.sources import pull

    with safe_open(str(pull("smollm2-135m", progress=False) / "model.safetensors"), "pt") as f:
        weight = f.get_tensor("model.layers.3.mlp.down_proj.weight").float()
    scheme = QuantScheme(format="lut", bits=3, granularity="channel")
    codebook = torch.quantile(weight, torch.linspace(0.01, 0.99, 8), dim=1).T.contiguous()
    qw = QuantizedWeight.from_codebook(nearest_codes(weight, codebook.half()), codebook, scheme)
    index = weight.abs().reshape(-1).topk(weight.numel() // 200).indices  # the largest 0.5% exactly
    qw = qw.with_outliers(weight.reshape(-1)[index] - qw.dequantize().reshape(-1)[index], index)
    assert_matches_reference(qw, rows=(1, 4, 64), bias=False)

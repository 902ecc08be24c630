"""The field table of ``QuantizedWeight``: every kind of stored tensor builds, validates, dequantizes,
counts its bits and survives a checkpoint."""

import pytest
import torch

from lowbit.api import load
from lowbit.formats import FORMATS, FormatName, make_format, pack
from lowbit.formats.codebook import lookup, nearest_codes
from lowbit.io.checkpoint import checkpoint_info, load_quantized, save_quantized
from lowbit.methods.rtn import quantize_rtn
from lowbit.nn import QuantLinear, set_submodule
from lowbit.pipeline.recipe import Recipe
from lowbit.qweight import FIELDS, QuantizedWeight, WeightLayout, expected_tensors, storage_bits_of
from lowbit.scheme import QuantScheme

GRID_SCHEMES = {
    FormatName.INT: QuantScheme(bits=4, group_size=64, symmetric=False),
    FormatName.NF4: QuantScheme(format="nf4", group_size=64, double_quant=True),
    FormatName.FP4: QuantScheme(format="fp4", group_size=32),
    FormatName.FP8_E4M3: QuantScheme(format="fp8_e4m3", bits=8, granularity="channel"),
    FormatName.FP8_E5M2: QuantScheme(format="fp8_e5m2", bits=8, granularity="channel"),
    FormatName.TERNARY: QuantScheme(format="ternary", bits=2, group_size=64),
    FormatName("iq4_nl"): QuantScheme(format="iq4_nl", group_size=32),
}
CODEBOOK_SCHEMES = {
    FormatName.LUT: QuantScheme(format="lut", bits=3, granularity="channel"),
    FormatName.VQ: QuantScheme(format="vq", bits=6, granularity="tensor", vector_dim=4),
}


def _weight(out=256, inp=512, seed=0):
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed))


def _codebook_weight(scheme: QuantScheme, w: torch.Tensor) -> QuantizedWeight:
    """Codes and codebook from quantiles of each scale row (a stand-in for k-means)."""
    layout = WeightLayout(scheme, tuple(w.shape))
    rows = w.reshape(layout.n_scale_rows, -1)
    K = 2**scheme.bits
    if scheme.vector_dim is None:
        codebook = torch.quantile(rows, torch.linspace(0.02, 0.98, K), dim=1).T.contiguous()
    else:
        vectors = rows.reshape(rows.shape[0], -1, scheme.vector_dim)
        codebook = vectors[:, torch.linspace(0, vectors.shape[1] - 1, K).long()]
    codes = nearest_codes(rows, codebook.half()).reshape(w.shape[0], -1)
    return QuantizedWeight.from_codebook(codes, codebook, scheme)


def test_every_format_lowbit_ships_has_a_test_scheme():
    shipped = {name for name, factory in FORMATS.items() if factory.__module__.startswith("lowbit.")}
    assert shipped == set(GRID_SCHEMES) | set(CODEBOOK_SCHEMES)


@pytest.mark.parametrize("name", list(GRID_SCHEMES), ids=lambda n: n.value)
def test_grid_format_round_trip_zeros_nan_and_shapes(name):
    scheme = GRID_SCHEMES[name]
    w = _weight()
    qw = quantize_rtn(w, scheme)
    again = QuantizedWeight.from_tensors(scheme, qw.shape, qw.tensors())
    assert torch.equal(again.dequantize(), qw.dequantize())
    assert torch.equal(again.codes(), make_format(scheme.format, scheme.bits, scheme.symmetric).encode(
        make_format(scheme.format, scheme.bits, scheme.symmetric).decode(again.codes())))
    assert qw.storage_bits() == storage_bits_of(expected_tensors(qw.layout))
    fmt = make_format(scheme.format, scheme.bits, scheme.symmetric)
    if 0 in fmt.decode(torch.arange(2**scheme.bits, dtype=torch.uint8)):  # iq4_nl's levels skip zero (1 * d)
        assert torch.count_nonzero(quantize_rtn(torch.zeros(256, 512), scheme).dequantize()) == 0
    bad = w.clone()
    bad[3, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        quantize_rtn(bad, scheme)
    if scheme.group_size is not None:
        with pytest.raises(ValueError, match="does not divide"):
            quantize_rtn(_weight(256, scheme.group_size * 3 + 8), scheme)


@pytest.mark.parametrize("name", list(CODEBOOK_SCHEMES), ids=lambda n: n.value)
def test_codebook_format_round_trip_bits_and_refusals(name):
    scheme = CODEBOOK_SCHEMES[name]
    w = _weight()
    qw = _codebook_weight(scheme, w)
    assert qw.codebook is not None and qw.scale is None
    dq = qw.dequantize()
    assert (dq - w).pow(2).mean() < w.pow(2).mean()  # the codebook fits the weight at all
    rows = qw.codes().reshape(qw.layout.n_scale_rows, -1)
    assert torch.equal(dq.reshape(qw.layout.n_scale_rows, -1), lookup(rows, qw.codebook))
    code_bits = 256 * 512 * scheme.bits // scheme.weights_per_code
    assert qw.storage_bits() == code_bits + qw.codebook.numel() * 16  # the codebook counts
    with pytest.raises(TypeError, match="own codebook"):
        scheme.number_format().decode(torch.zeros(3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="missing"):
        QuantizedWeight.from_tensors(scheme, qw.shape, {"qdata": qw.qdata})
    if scheme.vector_dim:
        with pytest.raises(ValueError, match="vector_dim 4 does not divide"):
            WeightLayout(scheme, (256, 514))


def test_codebook_schemes_refuse_scales_and_zero_points():
    with pytest.raises(ValueError, match="codebook"):
        QuantScheme(format="lut", bits=4, double_quant=True)
    with pytest.raises(ValueError, match="vector_dim is required"):
        QuantScheme(format="vq", bits=8)
    with pytest.raises(ValueError, match="vector_dim is required"):
        QuantScheme(bits=4, vector_dim=2)


def test_sparse_outliers_add_to_the_dense_weight_and_count():
    w = _weight()
    dense = quantize_rtn(w, QuantScheme(bits=3, group_size=64))
    err = (w - dense.dequantize()).abs().reshape(-1)
    index = err.topk(100).indices
    qw = dense.with_outliers(w.reshape(-1)[index] - dense.dequantize().reshape(-1)[index], index)
    assert qw.scheme.sparse and qw.layout.outliers == 100
    assert qw.outlier_index.dtype == torch.int32 and torch.all(qw.outlier_index[1:] > qw.outlier_index[:-1])
    torch.testing.assert_close(qw.dequantize().reshape(-1)[index], w.reshape(-1)[index], atol=1e-2, rtol=1e-3)
    assert qw.storage_bits() == dense.storage_bits() + 100 * (16 + 32)


def test_two_level_scales_follow_the_k_quant_formula():
    scheme = QuantScheme(bits=4, group_size=32, symmetric=False, zero_point="float", super_group=8, sub_scale_bits=6)
    g = torch.Generator().manual_seed(1)
    R, G = 64, 16  # in_features 512 = 16 groups of 32 = 2 super-blocks of 8 groups
    codes = torch.randint(0, 16, (R, 512), generator=g, dtype=torch.uint8)
    sub_scale = torch.randint(0, 64, (R, G), generator=g, dtype=torch.uint8)
    sub_min = torch.randint(0, 64, (R, G), generator=g, dtype=torch.uint8)
    d, dmin = torch.rand(R, 2, generator=g).half(), torch.rand(R, 2, generator=g).half()
    qw = QuantizedWeight.from_tensors(scheme, (R, 512), {
        "qdata": pack(codes, 4), "super_scale": d, "sub_scale": pack(sub_scale, 6),
        "super_min": dmin, "sub_min": pack(sub_min, 6)})
    scale = d.float().repeat_interleave(8, 1) * sub_scale.float()
    minimum = dmin.float().repeat_interleave(8, 1) * sub_min.float()
    want = (codes.float().reshape(R, G, 32) * scale[..., None] - minimum[..., None]).reshape(R, 512)
    torch.testing.assert_close(qw.dequantize(), want)
    assert qw.storage_bits() == R * 512 * 4 + 2 * (R * 2 * 16 + R * G * 6)


def test_group_index_maps_columns_to_groups():
    scheme = QuantScheme(bits=4, group_size=64, symmetric=False)
    w = _weight()
    qw = quantize_rtn(w, scheme)
    contiguous = torch.arange(512, dtype=torch.int32) // 64
    indexed = QuantizedWeight.from_tensors(QuantScheme(bits=4, group_size=64, symmetric=False, group_index=True),
                                           qw.shape, dict(qw.tensors(), g_idx=contiguous))
    assert torch.equal(indexed.dequantize(), qw.dequantize())
    shuffled = contiguous[torch.randperm(512, generator=torch.Generator().manual_seed(0))]
    moved = QuantizedWeight.from_tensors(indexed.scheme, qw.shape, dict(qw.tensors(), g_idx=shuffled))
    col = 7
    want = (qw.codes()[:, col].float() - qw.zeros()[:, shuffled[col]]) * qw.scales()[:, shuffled[col]]
    assert torch.equal(moved.dequantize()[:, col], want)


def test_every_field_is_declared_once_per_scheme():
    schemes = [*GRID_SCHEMES.values(), *CODEBOOK_SCHEMES.values(),
               QuantScheme(bits=4, group_size=32, symmetric=False, zero_point="float", super_group=8, sub_scale_bits=6),
               QuantScheme(bits=4, group_size=64, group_index=True, sparse=True)]
    for scheme in schemes:
        names = [f.name for f in FIELDS if f.present(scheme)]
        assert len(names) == len(set(names)), scheme.describe()


def test_schemes_without_extensions_record_what_they_did_before():
    d = QuantScheme(bits=4, group_size=64, symmetric=False).to_dict()
    assert set(d) == {"format", "bits", "granularity", "group_size", "symmetric", "zero_point", "observer",
                      "double_quant", "version"}
    lut = QuantScheme(format="lut", bits=3, granularity="channel", sparse=True)
    assert QuantScheme.from_dict(lut.to_dict()) == lut


def test_codebook_and_sparse_layers_survive_a_checkpoint(tiny_llama_dir, tmp_path):
    model, tokenizer = load(str(tiny_llama_dir))
    q = model.model.layers[0].self_attn.q_proj
    lut = _codebook_weight(CODEBOOK_SCHEMES[FormatName.LUT], q.weight.data)
    set_submodule(model, "model.layers.0.self_attn.q_proj", QuantLinear.from_quantized(lut))
    up = model.model.layers[1].mlp.up_proj
    dense = quantize_rtn(up.weight.data, QuantScheme(bits=4, group_size=64))
    index = torch.arange(0, up.weight.numel(), 997)
    sparse = dense.with_outliers(torch.ones(index.numel()), index)
    set_submodule(model, "model.layers.1.mlp.up_proj", QuantLinear.from_quantized(sparse))
    ids = torch.randint(0, model.config.vocab_size, (1, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
    save_quantized(model, tmp_path / "ck", recipe=Recipe(), tokenizer=tokenizer)
    loaded, _ = load_quantized(tmp_path / "ck")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, want)
    assert loaded.model.layers[1].mlp.up_proj.layout.outliers == index.numel()
    info = {r["name"]: r for r in checkpoint_info(tmp_path / "ck")["layers"]}
    assert info["model.layers.1.mlp.up_proj"]["bpw"] == sparse.bits_per_weight
    assert info["model.layers.0.self_attn.q_proj"]["bpw"] == lut.bits_per_weight

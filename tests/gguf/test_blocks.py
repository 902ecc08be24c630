"""GGUF blocks: layouts held to llama.cpp (its C bytes, gguf-py's quantizer and dequantizer), error
floors per type, importance weighting, the errors users see, and the lossless repacking of lowbit weights."""

from __future__ import annotations

from pathlib import Path

import gguf.quants
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from lowbit.gguf.blocks import (
    SUPPORTED_TYPES,
    block_size,
    dequantize_rows,
    fits,
    quantize_rows,
)
from lowbit.gguf.codes import from_quantized_weight, lossless_type
from lowbit.methods.rtn import quantize_rtn
from lowbit.scheme import QuantScheme

GOLDEN = Path(__file__).parent / "data" / "llama_cpp_golden.npz"
QUANTIZED = tuple(t for t in SUPPORTED_TYPES if block_size(t) > 1)
K_QUANTS = (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K)
LEGACY = (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1)
IGNORES_IMPORTANCE = (T.F32, T.F16, T.BF16, T.Q8_0, T.MXFP4)  # as in llama.cpp
TERNARY = (T.TQ1_0, T.TQ2_0)  # llama.cpp ignores the importance; lowbit fits the weighted-best scale
# The types gguf-py can quantize; its quantizers mirror llama.cpp's reference rounding.
GGUF_PY_QUANTIZES = (T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.MXFP4, T.TQ1_0,
                     T.TQ2_0)

# Largest per-row RMSE / row RMS on Gaussian rows (64 x 1024, 3 seeds), times 1.25 for headroom.
# Measured: F16 2e-4, BF16 1.7e-3, Q8_0 5.9e-3, Q6_K 0.019, Q5_1 0.041, Q5_0 0.047, Q5_K 0.039,
# Q4_K 0.076, Q4_1 0.084, Q4_0 0.097, Q3_K 0.162, Q2_K 0.315, IQ4_NL 0.080, IQ4_XS 0.081, MXFP4 0.124,
# IQ3_XXS 0.235, IQ2_XS 0.318, TQ1_0/TQ2_0 0.889 (max |x| as the ternary scale zeroes most of a Gaussian). For comparison a uniform step
# ``D`` gives RMSE ``D / sqrt(12)``: Q4_0's step is about absmax / 8, absmax of 32 Gaussians ~2.2
# sigma, so ~0.08 sigma.
REL_RMSE_BOUND = {
    T.F32: 0.0, T.F16: 3e-4, T.BF16: 2.5e-3, T.Q8_0: 7.5e-3, T.Q6_K: 0.024, T.Q5_1: 0.052,
    T.Q5_0: 0.06, T.Q5_K: 0.049, T.Q4_K: 0.095, T.Q4_1: 0.105, T.Q4_0: 0.122, T.Q3_K: 0.2, T.Q2_K: 0.39,
    T.IQ4_NL: 0.1, T.IQ4_XS: 0.1, T.MXFP4: 0.155, T.IQ3_XXS: 0.3, T.IQ2_XS: 0.4, T.TQ1_0: 1.0, T.TQ2_0: 1.0,
}


def gaussian(rows: int = 64, cols: int = 1024, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((rows, cols)) * 0.02).astype(np.float32)


def edge_rows(cols: int = 512) -> np.ndarray:
    """All-zero, constant (both signs), one huge outlier, tiny values, and an ordinary row."""
    rng = np.random.default_rng(7)
    x = np.zeros((6, cols), dtype=np.float32)
    x[1] = 0.25
    x[2] = -3.0
    x[3] = rng.standard_normal(cols) * 0.01
    x[3, 5] = 6.0e4  # near float16's largest value
    x[4] = rng.standard_normal(cols) * 1e-7
    x[5] = rng.standard_normal(cols)
    return x


def weighted_error(x: np.ndarray, data: np.ndarray, qtype: T, importance: np.ndarray) -> float:
    diff = dequantize_rows(data, qtype, x.shape[1]) - x
    return float((diff * diff * importance).sum())


@pytest.mark.parametrize("qtype", SUPPORTED_TYPES, ids=lambda t: t.name)
def test_bytes_decode_with_gguf_py(qtype: T) -> None:
    x = gaussian(8, 512)
    data = quantize_rows(x, qtype)
    bs, ts = GGML_QUANT_SIZES[qtype]
    assert data.dtype == np.uint8 and data.shape == (8, 512 // bs * ts)
    ref = gguf.quants.dequantize(data, qtype).reshape(x.shape)
    np.testing.assert_array_equal(dequantize_rows(data, qtype, 512), ref)


@pytest.mark.parametrize("qtype", QUANTIZED, ids=lambda t: t.name)
@pytest.mark.parametrize("imatrix", [False, True], ids=["ref", "imatrix"])
def test_matches_llama_cpp_bytes(qtype: T, imatrix: bool) -> None:
    """Golden bytes from llama.cpp's ggml_quantize_chunk (see data/make_llama_cpp_golden.py)."""
    golden = np.load(GOLDEN)
    x, importance = golden["rows"], golden["importance"]
    if not imatrix and qtype is T.IQ2_XS:
        pytest.skip("llama.cpp refuses IQ2_XS without an imatrix (ggml_quantize_requires_imatrix)")
    c_bytes = golden[qtype.name + ("_imatrix" if imatrix else "")]
    ours = quantize_rows(x, qtype, importance if imatrix else None)
    if not imatrix or qtype not in LEGACY + TERNARY:
        np.testing.assert_array_equal(ours, c_bytes)
        return
    if qtype in TERNARY:  # llama.cpp's bytes are its max-|x| scale whatever the imatrix; ours weigh it
        assert weighted_error(x, ours, qtype, importance) < weighted_error(x, c_bytes, qtype, importance)
        return
    # Legacy types with an imatrix: the same float16 scales (and minimums) as llama.cpp, but each
    # code re-rounded to the nearest level of those scales, so no value is worse than llama.cpp's.
    header = 2 if qtype in (T.Q4_0, T.Q5_0) else 4
    ts = GGML_QUANT_SIZES[qtype][1]
    np.testing.assert_array_equal(ours.reshape(-1, ts)[:, :header], c_bytes.reshape(-1, ts)[:, :header])
    ours_err = np.abs(dequantize_rows(ours, qtype, x.shape[1]) - x)
    c_err = np.abs(dequantize_rows(c_bytes, qtype, x.shape[1]) - x)
    assert (ours_err <= c_err * (1 + 1e-6) + 1e-12).all()
    assert weighted_error(x, ours, qtype, importance) < weighted_error(x, c_bytes, qtype, importance)


@pytest.mark.parametrize("qtype", GGUF_PY_QUANTIZES, ids=lambda t: t.name)
@pytest.mark.parametrize("case", ["gaussian", "edges"])
def test_same_bytes_as_gguf_py_quantize(qtype: T, case: str) -> None:
    x = gaussian(16, 512, seed=3) if case == "gaussian" else edge_rows()
    expected = gguf.quants.quantize(x, qtype).view(np.uint8)  # F32/F16 come back as floats
    np.testing.assert_array_equal(quantize_rows(x, qtype), expected)


@pytest.mark.parametrize("qtype", SUPPORTED_TYPES, ids=lambda t: t.name)
def test_edge_rows(qtype: T) -> None:
    x = edge_rows()
    y = dequantize_rows(quantize_rows(x, qtype), qtype, x.shape[1])
    assert np.isfinite(y).all()
    np.testing.assert_array_equal(y[0], 0.0)  # an all-zero row decodes to exact zeros
    # constant rows survive every type but the lattices: llama.cpp's searches try only lattice points
    # near the top level ((7, 7, 7, 7) for IQ3_XXS), which the codebooks lack, and take neighbours
    np.testing.assert_allclose(y[1:3], x[1:3], rtol=0.3 if qtype in (T.IQ3_XXS, T.IQ2_XS) else 1e-3)
    # the outlier keeps its size; MXFP4's top level is 1.5 x 2^floor(log2 max), so 6e4 becomes 49152;
    # IQ2_XS's 4-bit sub-block scale on its three odd levels lands 3.7% off
    tolerance = {T.MXFP4: 0.19, T.IQ2_XS: 0.05}.get(qtype, 0.02)
    assert abs(y[3, 5] - x[3, 5]) < tolerance * x[3, 5]


@pytest.mark.parametrize("qtype", [T.TQ1_0, T.TQ2_0])
def test_ternary_rounds_half_away_exactly_as_c(qtype: T) -> None:
    """lroundf(0.49999997) is 0; floor(x + 0.5) in float32 would give 1 (seen on SmolLM2's ffn_down)."""
    x = np.zeros((1, 256), dtype=np.float32)
    x[0, 0], x[0, 1], x[0, 2] = 1.0, np.nextafter(np.float32(0.5), np.float32(0)), 0.5
    y = dequantize_rows(quantize_rows(x, qtype), qtype, 256)
    assert (y[0, 0], y[0, 1], y[0, 2]) == (1.0, 0.0, 1.0)


@pytest.mark.parametrize("qtype", SUPPORTED_TYPES, ids=lambda t: t.name)
def test_error_bound_on_gaussian_rows(qtype: T) -> None:
    x = gaussian()
    y = dequantize_rows(quantize_rows(x, qtype), qtype, x.shape[1])
    rel = np.sqrt(((y - x) ** 2).mean(axis=1) / (x * x).mean(axis=1))
    assert rel.max() <= REL_RMSE_BOUND[qtype]


def test_k_quant_error_ordering() -> None:
    x = gaussian()

    def rel(qtype: T) -> float:
        y = dequantize_rows(quantize_rows(x, qtype), qtype, x.shape[1])
        return float(np.sqrt(((y - x) ** 2).mean() / (x * x).mean()))

    errors = [rel(t) for t in (T.Q8_0, T.Q6_K, T.Q5_K, T.Q4_K, T.Q3_K, T.Q2_K)]
    assert errors == sorted(errors)
    assert errors[0] < errors[1] / 2  # Q8_0 << Q6_K


@pytest.mark.parametrize("qtype", SUPPORTED_TYPES, ids=lambda t: t.name)
def test_importance_lowers_weighted_error(qtype: T) -> None:
    x = gaussian(32, 512, seed=5)
    importance = np.ones(512, dtype=np.float32)
    importance[np.random.default_rng(5).choice(512, 16, replace=False)] = 300.0  # a few heavy columns
    plain, weighted = quantize_rows(x, qtype), quantize_rows(x, qtype, importance)
    if qtype in IGNORES_IMPORTANCE:
        np.testing.assert_array_equal(weighted, plain)
        return
    assert weighted_error(x, weighted, qtype, importance) < 0.9 * weighted_error(x, plain, qtype, importance)


@pytest.mark.parametrize(("qtype", "lo", "hi"), [(T.Q8_0, -127, 127), (T.Q4_0, -8, 7), (T.Q5_0, -16, 15)],
                         ids=lambda v: getattr(v, "name", None))
def test_symmetric_grid_values_round_trip_exactly(qtype: T, lo: int, hi: int) -> None:
    q = np.resize(np.arange(lo, hi + 1), (4, 64)).astype(np.float32)
    q[:, ::32] = lo  # each block's largest magnitude sets d exactly
    x = q * np.float32(2.0**-6)
    np.testing.assert_array_equal(dequantize_rows(quantize_rows(x, qtype), qtype, 64), x)


@pytest.mark.parametrize("qtype", [T.Q4_1, T.Q5_1])
def test_asymmetric_grid_values_round_trip_exactly(qtype: T) -> None:
    top = 15 if qtype is T.Q4_1 else 31
    q = np.resize(np.arange(top + 1), (4, 64)).astype(np.float32)
    q[:, 0::32], q[:, 1::32] = 0, top  # each block spans the whole grid
    x = q * np.float32(2.0**-5) - np.float32(0.5)
    np.testing.assert_array_equal(dequantize_rows(quantize_rows(x, qtype), qtype, 64), x)


@pytest.mark.parametrize("qtype", QUANTIZED, ids=lambda t: t.name)
def test_deterministic(qtype: T) -> None:
    x, importance = gaussian(8, 512, seed=9), np.linspace(0.1, 2.0, 512, dtype=np.float32)
    np.testing.assert_array_equal(quantize_rows(x, qtype, importance), quantize_rows(x.copy(), qtype, importance))


@pytest.mark.parametrize("qtype", SUPPORTED_TYPES, ids=lambda t: t.name)
def test_cols_not_a_multiple_of_the_block(qtype: T) -> None:
    bs = block_size(qtype)
    assert fits(qtype, 2 * bs) and not fits(qtype, 0)
    if bs == 1:
        return
    assert not fits(qtype, bs + 16)
    with pytest.raises(ValueError, match=rf"{qtype.name} packs blocks of {bs} values, but cols={bs + 16}"):
        quantize_rows(np.zeros((2, bs + 16), np.float32), qtype)
    with pytest.raises(ValueError, match=f"cols={bs + 16}"):
        dequantize_rows(np.zeros((2, 10), np.uint8), qtype, bs + 16)


@pytest.mark.parametrize("qtype", [T.F16, T.Q4_0, T.Q4_K])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_raise(qtype: T, bad: float) -> None:
    x = gaussian(2, 256)
    x[1, 3] = bad
    with pytest.raises(ValueError, match="1 NaN/Inf values"):
        quantize_rows(x, qtype)


def test_bad_arguments_raise() -> None:
    x = gaussian(2, 256)
    with pytest.raises(ValueError, match="2-D float weight"):
        quantize_rows(x[0], T.Q8_0)
    with pytest.raises(ValueError, match="not supported"):
        quantize_rows(x, T.IQ2_XXS)
    with pytest.raises(ValueError, match=r"importance must be float \[cols\]=\[256\]"):
        quantize_rows(x, T.Q4_K, np.ones(255, np.float32))
    with pytest.raises(ValueError, match="finite and >= 0"):
        quantize_rows(x, T.Q4_K, -np.ones(256, np.float32))
    with pytest.raises(ValueError, match="beyond the float16 range"):
        quantize_rows(x * 1e7, T.Q8_0)
    assert quantize_rows(x * 1e7, T.BF16).shape == (2, 512)  # BF16 and F32 have no float16 fields
    with pytest.raises(ValueError, match=r"must be uint8 \[rows, 144\]"):
        dequantize_rows(np.zeros((2, 143), np.uint8), T.Q4_K, 256)


LOSSLESS_SCHEMES = [
    (QuantScheme(bits=8, group_size=32), T.Q8_0),
    (QuantScheme(bits=4, group_size=32), T.Q4_0),
    (QuantScheme(bits=5, group_size=32), T.Q5_0),
    (QuantScheme(bits=4, group_size=32, symmetric=False, zero_point="float"), T.Q4_1),
    (QuantScheme(bits=5, group_size=32, symmetric=False, zero_point="float"), T.Q5_1),
]


@pytest.mark.parametrize(("scheme", "qtype"), LOSSLESS_SCHEMES, ids=lambda v: getattr(v, "name", None))
def test_from_quantized_weight_is_exact(scheme: QuantScheme, qtype: T) -> None:
    w = torch.from_numpy(gaussian(48, 256, seed=11))
    w[0, :32] = 0  # an all-zero group
    qw = quantize_rtn(w, scheme)
    assert lossless_type(scheme) is qtype
    got_type, data = from_quantized_weight(qw)
    assert got_type is qtype
    np.testing.assert_array_equal(dequantize_rows(data, qtype, 256), qw.dequantize().numpy())


@pytest.mark.parametrize(("scheme", "reason"), [
    (QuantScheme(bits=4, group_size=32, symmetric=False), "integer zero-points"),
    (QuantScheme(bits=4, group_size=64), "groups of 32"),
    (QuantScheme(bits=4, granularity="channel"), "groups of 32"),
    (QuantScheme(format="nf4", bits=4, group_size=32), "nf4 has no GGUF block type"),
    (QuantScheme(bits=4, group_size=32, double_quant=True), "double-quantized"),
    (QuantScheme(bits=3, group_size=32), "symmetric int3"),
])
def test_from_quantized_weight_refuses_inexact_schemes(scheme: QuantScheme, reason: str) -> None:
    assert lossless_type(scheme) is None
    qw = quantize_rtn(torch.from_numpy(gaussian(4, 256)), scheme)
    with pytest.raises(ValueError, match=f"without requantizing: .*{reason}"):
        from_quantized_weight(qw)

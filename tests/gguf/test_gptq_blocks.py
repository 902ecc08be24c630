"""GPTQ onto GGUF blocks: the bytes decode (gguf-py, the oracle) to exactly the values the error
feedback used; the layer's output error beats llama.cpp's importance-weighted rounding on correlated
inputs and equals it (same bytes) when the Hessian is the identity; determinism; the errors users see.
Also the block fit that GPTQ builds on: ``fit_rows`` + ``pack_blocks`` are ``quantize_rows``, and the
fit's grid is what the decoder computes."""

from __future__ import annotations

import gguf.quants
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from lowbit.gguf.blocks import (
    CODECS,
    block_size,
    dequantize_rows,
    fit_rows,
    pack_blocks,
    quantize_rows,
)
from lowbit.gguf.gptq_blocks import _gptq, gptq_quantize_rows

TYPES = tuple(CODECS)  # Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K .. Q6_K
ROWS, COLS = 64, 512


@pytest.fixture(scope="module")
def layer() -> tuple[torch.Tensor, torch.Tensor]:
    """A weight ``[64, 512]`` and ``H = 2 X^T X / n`` of correlated inputs ``X = Z M``."""
    g = torch.Generator().manual_seed(0)
    M = torch.eye(COLS) + 0.9 * torch.randn(COLS, COLS, generator=g) / COLS**0.5
    X = torch.randn(2048, COLS, generator=g) @ M
    return torch.randn(ROWS, COLS, generator=g) * 0.02, 2 * X.T @ X / X.shape[0]


def output_error(W: torch.Tensor, Q: np.ndarray, H: torch.Tensor) -> float:
    """``||X^T (W - Q)||_F^2`` up to the factor 2/n: ``tr((W - Q) H (W - Q)^T)``."""
    D = W.double() - torch.from_numpy(Q).double()
    return float(torch.einsum("ij,jk,ik->", D, H.double(), D))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_bytes_decode_to_the_values_the_error_feedback_used(layer, qtype: T) -> None:
    W, H = layer
    data, Q = _gptq(W, H, qtype, None, 0.01, 128)
    assert data.dtype == np.uint8 and data.shape == quantize_rows(W.numpy(), qtype).shape
    # codes within range on the stored parameters' grid, exactly as llama.cpp's reader sees them
    np.testing.assert_array_equal(gguf.quants.dequantize(data, qtype).reshape(ROWS, COLS), Q.numpy())


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_lower_output_error_than_importance_weighted_rounding(layer, qtype: T) -> None:
    W, H = layer
    gptq = dequantize_rows(gptq_quantize_rows(W, H, qtype), qtype, COLS)
    rounded = dequantize_rows(quantize_rows(W.numpy(), qtype, H.diagonal().numpy()), qtype, COLS)
    assert output_error(W, gptq, H) < 0.85 * output_error(W, rounded, H)  # measured 0.56 (Q8_0) .. 0.71 (Q2_K)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_identity_hessian_is_importance_weighted_rounding(layer, qtype: T) -> None:
    """With ``H = I`` there is no error feedback: the same search, the nearest level of its grid."""
    W = layer[0].numpy()
    importance = np.linspace(0.5, 2.0, COLS, dtype=np.float32)
    ours = gptq_quantize_rows(W, torch.eye(COLS), qtype, importance=importance)
    theirs = quantize_rows(W, qtype, importance)
    if qtype not in (T.Q8_0, T.IQ4_NL, T.IQ4_XS):
        np.testing.assert_array_equal(ours, theirs)
        return
    # Q8_0 and IQ4_* round with 1/d before d goes to float16 (as llama.cpp); GPTQ rounds on the stored d
    err = [float(((dequantize_rows(d, qtype, COLS) - W) ** 2).sum()) for d in (ours, theirs)]
    assert err[0] <= err[1] * 1.01


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_K], ids=lambda t: t.name)
def test_deterministic_and_batch_width_free(layer, qtype: T) -> None:
    W, H = layer
    first = gptq_quantize_rows(W, H, qtype)
    np.testing.assert_array_equal(gptq_quantize_rows(W.numpy().astype(np.float64), H.double(), qtype), first)
    narrow = gptq_quantize_rows(W, H, qtype, block_columns=1)  # one block per lazy batch
    assert (narrow == first).mean() > 0.95  # float summation order flips a few roundings (0.6% for Q4_0)
    a, b = (output_error(W, dequantize_rows(d, qtype, COLS), H) for d in (first, narrow))
    assert abs(a - b) < 0.01 * a


def test_columns_without_input_are_zero(layer) -> None:
    W, H = layer
    H = H.clone()
    H[:, 40:50] = 0
    H[40:50, :] = 0
    Q = dequantize_rows(gptq_quantize_rows(W, H, T.Q4_0), T.Q4_0, COLS)
    np.testing.assert_array_equal(Q[:, 40:50], 0.0)


def test_indefinite_hessian_retries_with_more_dampening() -> None:
    W = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    pair = torch.tensor([[1.0, 1.5], [1.5, 1.0]])  # eigenvalues 2.5 and -0.5
    H = torch.block_diag(*[pair] * 32)
    with pytest.warns(UserWarning, match="not positive definite") as warned:
        data = gptq_quantize_rows(W, H, T.Q4_0)
    assert [str(w.message).split("; ")[1] for w in warned] == ["retrying with damp=0.1", "retrying with damp=1"]
    assert data.shape == (8, 2 * 18)
    with pytest.raises(ValueError, match="stays singular after 6 dampening retries"), pytest.warns(UserWarning):
        gptq_quantize_rows(W, torch.block_diag(*[torch.tensor([[1.0, 2e4], [2e4, 1.0]])] * 32), T.Q4_0)


def test_bad_inputs_raise(layer) -> None:
    W, H = layer
    bad = W.clone()
    bad[3, 7] = float("nan")
    with pytest.raises(ValueError, match="1 NaN/Inf values"):
        gptq_quantize_rows(bad, H, T.Q4_K)
    with pytest.raises(ValueError, match=r"must be \[512, 512\]"):
        gptq_quantize_rows(W, H[:256, :256], T.Q4_0)
    with pytest.raises(ValueError, match="NaN/Inf"):
        gptq_quantize_rows(W, H * float("inf"), T.Q4_0)
    with pytest.raises(ValueError, match="negative diagonal"):
        gptq_quantize_rows(W, -H, T.Q4_0)
    with pytest.raises(ValueError, match="2-D weight"):
        gptq_quantize_rows(W[0], H, T.Q4_0)
    with pytest.raises(ValueError, match="F16 stores plain floats"):
        gptq_quantize_rows(W, H, T.F16)
    with pytest.raises(ValueError, match="not supported"):
        gptq_quantize_rows(W, H, T.IQ2_XXS)
    with pytest.raises(ValueError, match="cols=288 is not a positive multiple of 256"):
        gptq_quantize_rows(W[:, :288], H[:288, :288], T.Q4_K)
    with pytest.raises(ValueError, match=r"importance must be float \[cols\]=\[512\]"):
        gptq_quantize_rows(W, H, T.Q4_0, importance=np.ones(511, np.float32))
    with pytest.raises(ValueError, match="block_columns must be an int >= 1"):
        gptq_quantize_rows(W, H, T.Q4_0, block_columns=0)
    with pytest.raises(ValueError, match="damp must be > 0"):
        gptq_quantize_rows(W, H, T.Q4_0, damp=0.0)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("imatrix", [False, True], ids=["ref", "imatrix"])
def test_block_fit_is_what_quantize_rows_stores(layer, qtype: T, imatrix: bool) -> None:
    x = layer[0].numpy()
    x[0, :256] = 0  # all-zero blocks: zero steps
    importance = np.linspace(0.1, 3.0, COLS, dtype=np.float32) if imatrix else None
    fit = fit_rows(x, qtype, importance)
    data = pack_blocks(qtype, fit.params, fit.codes)
    np.testing.assert_array_equal(data.reshape(ROWS, -1), quantize_rows(x, qtype, importance))
    bs, S = block_size(qtype), fit.step.shape[1]
    level = fit.codes.astype(np.float32) + fit.lo if fit.levels is None else fit.levels[fit.codes]
    level = level.reshape(-1, S, bs // S)
    grid = (fit.step[..., None] * level + fit.bias[..., None]).reshape(ROWS, COLS)
    np.testing.assert_array_equal(grid, gguf.quants.dequantize(data, qtype).reshape(ROWS, COLS))

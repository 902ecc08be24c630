"""GGUF block types read as lowbit codes: gguf-py's dequantizer is the oracle, bit for bit, and
writing the codes back gives the bytes they were read from."""

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

from lowbit.gguf.blocks import quantize_rows
from lowbit.gguf.codes import (BLOCK_SCHEMES, from_quantized_weight, lossless_mismatch, lossless_type,
                               to_quantized_weight)
from lowbit.scheme import QuantScheme

ROWS, COLS = 16, 512


def _blocks(qtype: T, seed: int = 0) -> np.ndarray:
    """Real blocks of ``qtype``: llama.cpp's reference quantizer on Gaussian rows, one row all zero and
    one with an outlier, so a block has a zero scale and a sub-block a large one."""
    w = np.random.default_rng(seed).standard_normal((ROWS, COLS)).astype(np.float32) * 0.05
    w[1] = 0
    w[2, 7] = 3.0
    return quantize_rows(w, qtype)


@pytest.mark.parametrize("qtype", list(BLOCK_SCHEMES), ids=lambda t: t.name)
def test_read_codes_dequantize_as_gguf_py_and_write_back_the_same_bytes(qtype: T) -> None:
    data = _blocks(qtype)
    qw = to_quantized_weight(data, qtype, (ROWS, COLS))
    want = dequantize(data, qtype).reshape(ROWS, COLS)
    assert np.array_equal(qw.dequantize().numpy().view(np.uint32), want.view(np.uint32))
    assert lossless_type(qw.scheme) is qtype
    got_type, back = from_quantized_weight(qw)
    assert got_type is qtype and np.array_equal(back, data)


@pytest.mark.parametrize("qtype", list(BLOCK_SCHEMES), ids=lambda t: t.name)
def test_arbitrary_code_bytes_round_trip(qtype: T) -> None:
    """Every code bit is carried: random code bytes under the real blocks' scales survive read + write."""
    data = _blocks(qtype, seed=1).copy()
    rng = np.random.default_rng(2)
    entry = BLOCK_SCHEMES[qtype]
    fields = entry.read(data.reshape(-1, GGML_QUANT_SIZES[qtype][1]))
    fields.codes = rng.integers(0, 2**entry.scheme.bits, fields.codes.shape, dtype=np.uint8)
    again = entry.write(fields).reshape(ROWS, -1)
    qw = to_quantized_weight(again, qtype, (ROWS, COLS))
    assert np.array_equal(qw.dequantize().numpy(), dequantize(again, qtype).reshape(ROWS, COLS))
    assert np.array_equal(from_quantized_weight(qw)[1], again)


def test_unmapped_types_and_bad_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="IQ2_XS has no lowbit scheme; dequantize it"):
        to_quantized_weight(np.zeros((2, 74), np.uint8), T.IQ2_XS, (2, 256))
    with pytest.raises(ValueError, match=r"must be uint8 \[2, 68\]"):
        to_quantized_weight(np.zeros((2, 67), np.uint8), T.Q8_0, (2, 64))


def test_two_level_schemes_name_the_layouts_gguf_has() -> None:
    odd = QuantScheme(bits=4, group_size=32, symmetric=False, zero_point="float", super_group=4, sub_scale_bits=6)
    assert lossless_type(odd) is None
    assert "Q4_K int4 g32 asym-fmin 2-level x8 s6" in lossless_mismatch(odd)
    signed = QuantScheme(bits=6, group_size=16, super_group=16, sub_scale_bits=8, sub_scale_signed=True)
    assert lossless_type(signed) is T.Q6_K
    with pytest.raises(ValueError, match="signed sub-scale codes"):
        QuantScheme(bits=4, group_size=32, symmetric=False, zero_point="float", sub_scale_signed=True)

"""Write ``llama_cpp_golden.npz``: llama.cpp's own bytes for a few rows of every supported type.

The bytes come from ``ggml_quantize_chunk`` (what ``llama-quantize`` calls) in ggml's C library,
with and without an importance matrix. The test suite compares lowbit's blocks with them and so
needs no C build. To regenerate, build ggml-base from llama.cpp's ``ggml/src`` (the copy vendored
in the llama-cpp-python 0.3.36 sdist was used: ``gcc -O2`` for x86-64 without ``-march``, so no
fused multiply-add contracts C's float arithmetic; the ``libggml-base.so`` bundled in the
llama-cpp-python 0.3.36 wheel gives the same bytes for every type) and run::

    python tests/gguf/data/make_llama_cpp_golden.py path/to/libggml-base.so
"""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from lowbit.gguf.blocks import SUPPORTED_TYPES

COLS = 512  # a multiple of every supported block size
NEEDS_IMATRIX = (GGMLQuantizationType.IQ2_XS,)  # ggml_quantize_requires_imatrix


def golden_inputs() -> tuple[np.ndarray, np.ndarray]:
    """Rows that exercise the searches (``[8, COLS]``) and an importance vector (``[COLS]``)."""
    rng = np.random.default_rng(20250601)
    rows = np.zeros((8, COLS), dtype=np.float32)
    rows[0] = rng.standard_normal(COLS) * 0.02
    rows[1] = rng.standard_normal(COLS) * 0.02
    rows[1, rng.choice(COLS, 6, replace=False)] *= 30  # a few outliers
    # rows[2] stays all zero
    rows[3] = 0.013  # constant, positive
    rows[4] = -0.7  # constant, negative
    rows[5] = rng.uniform(-3, 3, COLS)
    rows[5, 77] = 900.0  # one huge outlier
    rows[6] = rng.standard_normal(COLS) * 1e-6  # float16 scales become subnormal
    rows[7] = rng.laplace(0, 0.05, COLS)
    importance = rng.gamma(0.3, size=COLS) + 1e-4
    importance[rng.choice(COLS, 8, replace=False)] *= 200  # a few heavy input columns
    importance[rng.choice(COLS, 4, replace=False)] = 0  # dead input columns
    return rows, importance.astype(np.float32)


def c_quantize(lib: ctypes.CDLL, rows: np.ndarray, qtype: int, importance: np.ndarray | None) -> np.ndarray:
    block, size = GGML_QUANT_SIZES[qtype]
    out = np.zeros((rows.shape[0], rows.shape[1] // block * size), dtype=np.uint8)
    lib.ggml_quantize_chunk(int(qtype), rows.ctypes.data, out.ctypes.data, 0, rows.shape[0], rows.shape[1],
                            None if importance is None else importance.ctypes.data)
    return out


def main(lib_path: str) -> None:
    lib = ctypes.CDLL(lib_path)
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    rows, importance = golden_inputs()
    arrays = {"rows": rows, "importance": importance}
    for qtype in SUPPORTED_TYPES:
        if GGML_QUANT_SIZES[qtype][0] == 1:  # F32, F16, BF16: the tests hold them to gguf-py instead
            continue
        if qtype not in NEEDS_IMATRIX:  # ggml_quantize_chunk asserts an imatrix for these
            arrays[qtype.name] = c_quantize(lib, rows, qtype, None)
        arrays[f"{qtype.name}_imatrix"] = c_quantize(lib, rows, qtype, importance)
    np.savez_compressed(Path(__file__).with_name("llama_cpp_golden.npz"), **arrays)


if __name__ == "__main__":
    main(sys.argv[1])

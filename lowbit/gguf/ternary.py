"""llama.cpp's ternary block types TQ1_0 and TQ2_0: ``x ~ d t``, ``t`` in {-1, 0, 1}, one float16
``d`` per 256 values (BitNet b1.58 / TriLM models, trained for it).

TQ2_0 packs each trit in 2 bits (2.06 bits per value); TQ1_0 packs five trits in a byte as a
base-3 number scaled to 0..255 (1.69 bits per value). ``fit_ternary(x, qw)`` takes super-blocks
``x`` float32 ``[B, 256]``:

- without importance it is ggml-quants.c's ``quantize_row_tq1_0_ref``/``tq2_0_ref`` (what
  ``llama-quantize`` runs, imatrix or not): ``d = max |x|``, ``t = roundf(x / d)``. On weights not
  trained to be ternary that zeroes everything below half the largest magnitude.
- with importance ``qw`` (lowbit's, llama.cpp has none here) it picks the scale that minimises
  ``sum qw (x - d t)^2`` exactly: for a given set of nonzero trits the best ``d`` is the weighted
  mean of their ``|x|``, and the best set is always the ``k`` largest ``|x|`` for some ``k``, so all
  256 candidates are scored at once from cumulative sums; codes are then re-rounded on the stored
  float16 ``d``.
"""

from __future__ import annotations

import numpy as np

from lowbit.gguf.scale_search import F32, BlockFit, round_half_away

QK_K = 256
_POW3_5 = np.array([81, 27, 9, 3, 1], dtype=np.uint16)  # the first trit is the most significant
_POW3_4 = np.array([81, 27, 9, 3], dtype=np.uint16)  # qh: four trits in the top four places


def _best_scale(x: np.ndarray, qw: np.ndarray) -> np.ndarray:
    """``argmin_d min_t sum qw (x - d t)^2`` over ternary ``t`` per block ``[B]`` (``max |x|`` where
    every weight is 0)."""
    a = np.abs(x)
    order = np.argsort(-a, axis=1, kind="stable")
    a_sorted = np.take_along_axis(a, order, axis=1).astype(np.float64)
    w_sorted = np.take_along_axis(qw, order, axis=1).astype(np.float64)
    cum_wa = np.cumsum(w_sorted * a_sorted, axis=1)
    cum_w = np.cumsum(w_sorted, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        gain = np.where(cum_w > 0, cum_wa * cum_wa / np.where(cum_w > 0, cum_w, 1.0), 0.0)
    k = gain.argmax(axis=1)[:, None]
    best = np.take_along_axis(cum_wa, k, axis=1)[:, 0] / np.maximum(np.take_along_axis(cum_w, k, axis=1)[:, 0], 1e-300)
    return np.where(gain.max(axis=1) > 0, best, a.max(axis=1)).astype(F32)


def fit_ternary(x: np.ndarray, qw: np.ndarray | None) -> BlockFit:
    """TQ1_0/TQ2_0 parameters (the float16 ``d``) and trit codes ``t + 1`` in 0..2 of ``x [B, 256]``."""
    if qw is None:
        d = np.abs(x).max(axis=1)
        with np.errstate(divide="ignore"):
            inv = np.where(d != 0, F32(1) / np.where(d != 0, d, F32(1)), F32(0))
        t = round_half_away(x * inv[:, None])
        h = d.astype(np.float16)
    else:
        h = _best_scale(x, qw).astype(np.float16)
        d16 = h.astype(F32)[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.where(d16 != 0, np.clip(np.rint(x / np.where(d16 != 0, d16, F32(1))), -1, 1), F32(0))
    codes = np.clip(t + 1, 0, 2).astype(np.uint8)
    step = h.astype(F32)[:, None]
    return BlockFit(h.reshape(-1, 1).view(np.uint8), step, np.zeros_like(step), codes, -1, 1)


def pack_tq2_0_codes(codes: np.ndarray) -> np.ndarray:
    """TQ2_0's ``qs[64]`` from trit codes ``[B, 256]``: in each half of 128 values byte ``m`` holds
    values ``m, m+32, m+64, m+96`` from the low bits up."""
    q = codes.reshape(-1, 2, 4, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(-1, 64)


def _trit_bytes(q: np.ndarray) -> np.ndarray:
    """A base-3 number ``0..242`` -> ``ceil(q * 256 / 243)``, the byte whose top trit reads back first."""
    return ((q.astype(np.uint16) * 256 + 242) // 243).astype(np.uint8)


def pack_tq1_0_codes(codes: np.ndarray) -> np.ndarray:
    """TQ1_0's ``qs[48]`` and ``qh[4]`` from trit codes ``[B, 256]``.

    Values 0..159: byte ``m < 32`` holds ``m + 32 n``, n = 0..4; values 160..239: byte ``32 + m``
    holds ``160 + m + 16 n``; values 240..255: ``qh[j]`` holds ``240 + j + 4 n``, n = 0..3.
    """
    c = codes.astype(np.uint16)
    first = (c[:, :160].reshape(-1, 5, 32) * _POW3_5[:, None]).sum(axis=1)
    second = (c[:, 160:240].reshape(-1, 5, 16) * _POW3_5[:, None]).sum(axis=1)
    qh = (c[:, 240:].reshape(-1, 4, 4) * _POW3_4[:, None]).sum(axis=1)
    return np.concatenate([_trit_bytes(first), _trit_bytes(second), _trit_bytes(qh)], axis=1)

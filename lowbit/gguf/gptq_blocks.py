"""GPTQ onto llama.cpp's GGUF block grids: the bytes of ``quantize_rows``, the codes of GPTQ.

Frantar et al., "GPTQ" (ICLR 2023), Algorithm 1, run by ``lowbit.methods.gptq`` (``H`` the
inputs' Hessian, dampened, ``Hinv`` the upper Cholesky factor of ``H^-1``, lazy batch updates),
with the grid of each column taken from the GGUF block that holds it. When the column loop reaches
the first column of a block (32 values for Q4_0..Q8_0, the 256-value super-block for k-quants,
whose sub-block scales, minimums and super-scales are all chosen at once), that block's parameters
come from ``fit_rows``, llama.cpp's importance-weighted search that ``quantize_rows`` runs, applied
to the current, error-updated weights of its columns in every row. Each column is then rounded to
the nearest level of the block's grid as the decoder computes it from the stored float16 and 6-bit
parameters, its rounding error is pushed onto the later columns, and at the end the chosen
parameters and codes are packed with ``pack_blocks``. Columns go in natural order: a GGUF tensor
has no permutation to undo act-order. The column loop is ``lowbit.methods.gptq.gptq_column_loop``,
the one the scalar grids use; only ``_BlockColumns``, how a column's values are chosen, is GGUF's.

What stays llama.cpp's: the parameter search and every byte of the layout, so any GGUF reader
decodes the result. What changes: the codes (GPTQ's instead of nearest rounding) and so the
weights each later block's parameters are fitted to.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from torch import Tensor

from lowbit.gguf.blocks import (
    _check_block_type,
    _checked_importance,
    _checked_weight,
    fit_rows,
    pack_blocks,
)
from lowbit.gguf.scale_search import F32, BlockFit, seq_sum
from lowbit.methods.gptq import GPTQConfig, check_hessian, gptq_column_loop, inverse_hessian_factor


@torch.no_grad()
def gptq_quantize_rows(weight: np.ndarray | Tensor, hessian: Tensor, qtype: GGMLQuantizationType, *,
                       importance: np.ndarray | None = None, damp: float = 0.01,
                       block_columns: int = 128) -> np.ndarray:
    """GPTQ (Frantar et al. 2022) onto the block grid of ``qtype``: same bytes layout as ``quantize_rows``.

    Args:
        weight: float ``[rows, cols]`` (numpy or torch, any float dtype and device), a linear's
            weight with ``cols`` its input features, a multiple of ``qtype``'s block size.
        hessian: ``[cols, cols]``, ``H = 2 X^T X / n`` of the layer's calibration inputs
            (``lowbit.methods.gptq.accumulate_hessian``); not modified.
        qtype: a block type of ``blocks.CODECS`` (Q4_0 .. Q8_0, Q2_K .. Q6_K).
        importance: float ``[cols]``, the imatrix that weighs the parameter search; by default
            ``diag(H)``, twice llama.cpp's imatrix (mean ``x^2`` per input column), and the searches
            do not depend on its scale.
        damp: fraction of mean ``diag(H)`` added to the diagonal before inverting (IST percdamp).
        block_columns: lazy batch update width, rounded down to whole blocks (at least one):
            changes speed, not the result beyond float summation order.

    Returns:
        uint8 ``[rows, cols // block_size * type_size]``, decoded by ``dequantize_rows`` and any GGUF
        reader. Deterministic. Computed on CPU in float32. Columns that never see input
        (``H[i, i] == 0``) are set to zero first, as ``gptq_quantize`` does.

    Raises:
        ValueError: a float or unsupported ``qtype``; ``weight`` not 2-D, with NaN/Inf, beyond
            float16 range or with ``cols`` not a multiple of the block size; ``hessian`` not
            ``[cols, cols]``, with NaN/Inf or a negative diagonal, or still not positive definite
            after the dampening retries of ``GPTQConfig`` (each retry multiplies ``damp`` by 10 and
            warns); a bad ``importance``, ``damp`` or ``block_columns``.
    """
    return _gptq(weight, hessian, qtype, importance, damp, block_columns)[0]


def _gptq(weight: np.ndarray | Tensor, hessian: Tensor, qtype: GGMLQuantizationType, importance: np.ndarray | None,
          damp: float, block_columns: int) -> tuple[np.ndarray, Tensor]:
    """``gptq_quantize_rows``, also returning float32 ``[rows, cols]``: the values the error feedback
    used, which the returned bytes decode to."""
    if isinstance(weight, Tensor):
        weight = weight.detach().to("cpu", torch.float32).numpy()
    if np.ndim(weight) != 2:
        raise ValueError(f"GPTQ needs a 2-D weight [rows, cols] (cols = input features), got shape {np.shape(weight)}")
    _check_block_type(qtype)
    W = torch.from_numpy(_checked_weight(weight, qtype).copy())
    if not (isinstance(block_columns, int) and block_columns >= 1):
        raise ValueError(f"block_columns must be an int >= 1 (e.g. 128), got {block_columns!r}")
    config = GPTQConfig(damp=damp, act_order=False)
    cols = W.shape[1]
    check_hessian(hessian, cols, "weight")
    H = hessian.detach().to("cpu", torch.float32, copy=True)
    diag = H.diagonal()
    if bool((diag < 0).any()):
        raise ValueError(f"Hessian has {int((diag < 0).sum())} negative diagonal entries; it must be 2 X^T X "
                         "of the layer's inputs (accumulate_hessian), which is positive semi-definite")
    qw = diag.numpy().copy() if importance is None else _checked_importance(importance, cols, qtype)
    dead = diag == 0
    diag.masked_fill_(dead, 1.0)
    W[:, dead] = 0.0
    Wn = W.numpy()
    sigma2 = seq_sum(Wn * Wn) / F32(cols)  # legacy types' row mean square, as quantize_rows takes it
    Hinv = inverse_hessian_factor(H, config, "weight")
    bs = GGML_QUANT_SIZES[qtype][0]
    columns = _BlockColumns(W.shape, qtype, qw, sigma2)
    gptq_column_loop(W, Hinv, max(1, block_columns // bs) * bs, columns)  # a block's columns share a batch
    params = np.stack(columns.params, axis=1)
    data = pack_blocks(qtype, params.reshape(-1, params.shape[-1]), columns.codes.reshape(-1, bs))
    return data.reshape(W.shape[0], -1), columns.values


class _BlockGrid:
    """The grid of one block column range for every row, laid out for the column loop.

    ``step``, ``bias``: float32 ``[bs, rows]`` per column (a sub-block's values repeated), so that a
    column's are contiguous; ``index`` collects each column's chosen level: the signed level of a
    uniform grid, or the position in the sorted table of a table grid (``BlockFit.levels``).
    """

    def __init__(self, fit: BlockFit, bs: int) -> None:
        per = bs // fit.step.shape[1]
        self.fit = fit
        self.step = torch.from_numpy(np.repeat(fit.step, per, axis=1).T.copy())
        self.bias = torch.from_numpy(np.repeat(fit.bias, per, axis=1).T.copy())
        self.safe = torch.where(self.step == 0, 1.0, self.step)  # a zero step decodes to bias whatever the code
        self.index = torch.empty_like(self.step)
        if fit.levels is not None:  # the distinct levels sorted, the first code of each, the midpoints between
            table, first = np.unique(fit.levels, return_index=True)  # MXFP4 has 0 and -0
            self.table = torch.from_numpy(table)
            self.table_codes = torch.from_numpy(first.astype(np.uint8))
            self.midpoints = (self.table[1:] + self.table[:-1]) / 2

    def round(self, j: int, w: Tensor) -> Tensor:
        """The grid value nearest ``w [rows]`` for the ``j``-th column, computed as the decoder does."""
        t = torch.sub(w, self.bias[j]).div_(self.safe[j])
        if self.fit.levels is None:
            level = self.index[j]
            torch.round(t, out=level).clamp_(self.fit.lo, self.fit.hi)
        else:
            position = torch.bucketize(t, self.midpoints)
            self.index[j] = position.to(torch.float32)
            level = self.table[position]
        return torch.mul(level, self.step[j]).add_(self.bias[j])

    def codes(self) -> np.ndarray:
        """uint8 ``[rows, bs]``; where the stored step is 0 the search's own code (any decodes the same)."""
        if self.fit.levels is None:
            chosen = (self.index.T - self.fit.lo).to(torch.uint8).numpy()
        else:
            chosen = self.table_codes[self.index.T.to(torch.long)].numpy()
        return np.where(self.step.T.numpy() == 0, self.fit.codes, chosen)


class _BlockColumns:
    """``ColumnQuantizer`` of a GGUF block grid: at the first column of a block, the block's parameters
    from ``fit_rows`` on its columns' current values; each column rounded to its block's grid.

    Collects the parameter bytes of every block (``params``: per block uint8 ``[rows, P]``), the
    codes (uint8 ``[rows, cols]``) and the quantized values (float32 ``[rows, cols]``).
    """

    def __init__(self, shape: torch.Size, qtype: GGMLQuantizationType, qw: np.ndarray, sigma2: np.ndarray) -> None:
        self.qtype, self.qw, self.sigma2 = qtype, qw, sigma2
        self.bs = GGML_QUANT_SIZES[qtype][0]
        self.params: list[np.ndarray] = []
        self.codes = np.empty(tuple(shape), dtype=np.uint8)
        self.values = torch.empty(tuple(shape), dtype=torch.float32)
        self.grid: _BlockGrid | None = None

    def __call__(self, j: int, w: Tensor, current: Callable[[Tensor | slice], Tensor]) -> Tensor:
        b = j % self.bs
        if b == 0:
            fit = fit_rows(current(slice(j, j + self.bs)).numpy(), self.qtype, self.qw[j:j + self.bs],
                           row_sigma2=self.sigma2)
            self.grid = _BlockGrid(fit, self.bs)
        q = self.grid.round(b, w)
        self.values[:, j] = q
        if b == self.bs - 1:
            self.params.append(self.grid.fit.params)
            self.codes[:, j + 1 - self.bs:j + 1] = self.grid.codes()
        return q

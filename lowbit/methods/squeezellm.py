"""SqueezeLLM: sensitivity-weighted non-uniform levels plus a sparse part of exact outliers.

Kim, Hooper, Gholami, Dong, Li, Shen, Mahoney, Keutzer, "SqueezeLLM: Dense-and-Sparse
Quantization" (ICML 2024). Per weight:

1. Dense-and-sparse split: a fraction ``outlier_fraction`` of the weight's entries is kept exactly
   in a sparse part (``outlier_values`` f16 + ``outlier_index`` int32 of the ``QuantizedWeight``):
   ``sensitive_share`` of them are the entries of largest Fisher information, the rest those of
   largest magnitude (outside the range ``[-T, T]`` that holds every other entry).
2. Per scale row (an output row with ``--per-channel``) a 1-D k-means with ``2**bits`` centroids
   over the remaining entries, each weighted by its Fisher information (the loss's sensitivity to
   it); the sorted centroids, rounded to float16, are the row's lookup table (format ``lut``).
   Vectorised over rows; initialised at the weighted quantiles (deterministic: no seed needed).
3. Codes: with ``error_feedback`` (the default) GPTQ's column loop (``gptq_column_loop``) rounds
   each column to its row's nearest level and pushes the error onto the columns not yet quantized
   (Hessian of the layer's inputs, as GPTQ); the kept outliers take their current value, so they
   add no error. Without it, every entry goes to its nearest level. Each outlier is stored as the
   difference between its value and its code's level (the sparse part is added to the dense one).

What it stores: ``bits`` per code, ``2**bits`` float16 levels per scale row, 48 bits per outlier;
``bits_per_weight`` counts all of it. Declares the Fisher and the Hessian (``Statistic``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lowbit.formats import FormatName
from lowbit.methods.gptq import GPTQConfig, check_hessian, gptq_column_loop, inverse_hessian_factor
from lowbit.methods.registry import InputStatistics, Statistic, register_method
from lowbit.methods.rtn import check_finite
from lowbit.quantizer import rows_shape
from lowbit.qweight import QuantizedWeight
from lowbit.scheme import QuantScheme

MAX_OUTLIER_FRACTION = 0.1


@dataclass(frozen=True)
class SqueezeLLMConfig:
    """The knobs of SqueezeLLM (module docstring). Each outlier costs 48 bits (an f16 value and an
    int32 position): ``outlier_fraction`` 0.0025 adds 0.12 bits per weight.

    ``fisher_samples``: how many of the calibration windows the Fisher is computed on (0: all of
    them); each costs a forward and a backward pass of the whole model, the Hessians still see every
    window."""

    outlier_fraction: float = 0.0025
    sensitive_share: float = 0.1  # of the outliers, the share chosen by Fisher information
    kmeans_iterations: int = 50
    error_feedback: bool = True
    refine: bool = True  # with error_feedback: refit each row's levels to its codes (least squares in H)
    damp: float = 0.01
    act_order: bool = True
    block_size: int = 128
    fisher_samples: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.outlier_fraction, (int, float)) and not isinstance(self.outlier_fraction, bool)
                and 0 <= self.outlier_fraction <= MAX_OUTLIER_FRACTION):
            raise ValueError(f"outlier fraction must be in [0, {MAX_OUTLIER_FRACTION}] (a share of each weight's "
                             f"entries kept exactly, e.g. 0.0025), got {self.outlier_fraction!r}")
        if not 0 <= self.sensitive_share <= 1:
            raise ValueError(f"sensitive_share must be in [0, 1], got {self.sensitive_share!r}")
        for name in ("kmeans_iterations", "block_size"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not (isinstance(self.fisher_samples, int) and self.fisher_samples >= 0):
            raise ValueError(f"fisher_samples must be an int >= 0 (0: every calibration window), got "
                             f"{self.fisher_samples!r}")
        GPTQConfig(damp=self.damp)  # refuses a bad dampening with GPTQ's message


def weighted_objective(x: Tensor, weight: Tensor, centroids: Tensor) -> Tensor:
    """Per row ``sum_i weight_i (x_i - nearest centroid)^2`` for ``x, weight [rows, n]``, ``centroids [rows, K]``."""
    q = torch.gather(centroids, 1, nearest_level(x, centroids))
    return (weight * (x - q) ** 2).sum(1)


def nearest_level(x: Tensor, levels: Tensor) -> Tensor:
    """int64 index ``[rows, n]`` of the nearest of each row's sorted ``levels [rows, K]`` (ties: the lower)."""
    mid = (levels[:, 1:] + levels[:, :-1]) / 2
    return torch.searchsorted(mid.contiguous(), x.contiguous())


def weighted_quantiles(x: Tensor, weight: Tensor, K: int) -> Tensor:
    """Per row, the values at weighted quantiles ``(k + 1/2) / K`` of ``x [rows, n]``: ``[rows, K]``, sorted."""
    xs, order = x.sort(1)
    cum = torch.gather(weight, 1, order).cumsum(1)
    total = cum[:, -1:].clamp_min(torch.finfo(cum.dtype).tiny)
    targets = (torch.arange(K, dtype=x.dtype, device=x.device) + 0.5) / K * total
    at = torch.searchsorted(cum.contiguous(), targets.contiguous()).clamp_max(x.shape[1] - 1)
    return torch.gather(xs, 1, at)


@torch.no_grad()
def weighted_kmeans(x: Tensor, weight: Tensor, K: int, iterations: int = 50) -> Tensor:
    """Sorted centroids ``[rows, K]`` of a 1-D k-means per row of ``x [rows, n]`` whose points count
    ``weight [rows, n] >= 0`` (a zero weight: the point is ignored).

    Lloyd's iterations from the weighted quantiles, all rows at once; a centroid whose cluster is
    empty (or weightless) stays where it is. Each iteration never raises a row's weighted
    objective; stops when no assignment changes. Deterministic.
    """
    x, weight = x.float(), weight.float()
    rows = x.shape[0]
    centroids = weighted_quantiles(x, weight, K)
    offset = torch.arange(rows, device=x.device)[:, None] * K
    codes = None
    for _ in range(iterations):
        new = nearest_level(x, centroids)
        if codes is not None and torch.equal(new, codes):
            break
        codes = new
        index = (codes + offset).reshape(-1)
        wsum = torch.zeros(rows * K, dtype=x.dtype, device=x.device).index_add_(0, index, weight.reshape(-1))
        xsum = torch.zeros(rows * K, dtype=x.dtype, device=x.device).index_add_(0, index, (weight * x).reshape(-1))
        filled = wsum > 0
        flat = centroids.reshape(-1).clone()
        flat[filled] = xsum[filled] / wsum[filled]
        centroids = flat.reshape(rows, K).sort(1).values
    return centroids


def outlier_mask(weight: Tensor, fisher: Tensor, fraction: float, sensitive_share: float) -> Tensor:
    """bool ``[out, in]``: the ``round(fraction * numel)`` entries kept exactly, ``sensitive_share`` of
    them by largest Fisher, the rest by largest ``|w|`` among the others. Ties go to the lower flat
    position (a stable sort), so the choice is deterministic."""
    n = weight.numel()
    k = int(round(fraction * n))
    mask = torch.zeros(n, dtype=torch.bool, device=weight.device)
    if k == 0:
        return mask.reshape(weight.shape)
    k_sensitive = int(round(k * sensitive_share))
    if k_sensitive:
        mask[torch.sort(fisher.reshape(-1), descending=True, stable=True).indices[:k_sensitive]] = True
    magnitude = weight.reshape(-1).abs().masked_fill(mask, -1.0)
    mask[torch.sort(magnitude, descending=True, stable=True).indices[:k - k_sensitive]] = True
    return mask.reshape(weight.shape)


class _TableColumns:
    """``ColumnQuantizer`` for GPTQ's loop: each row's nearest level of its scale row's table; kept
    outliers keep their current value. ``tables [rows, G, K]``, ``group_at[j]``: the group of the
    column at position ``j``; ``kept [rows, n]`` in processing order."""

    def __init__(self, tables: Tensor, group_at: list[int], kept: Tensor) -> None:
        self.tables = tables
        self.mid = (self.tables[..., 1:] + self.tables[..., :-1]) / 2
        self.group_at, self.kept = group_at, kept
        self.codes = torch.empty(kept.shape, dtype=torch.uint8, device=kept.device)
        self.values = torch.zeros(kept.shape, dtype=torch.float32, device=kept.device)  # kept outliers' current values

    def __call__(self, j: int, w: Tensor, current) -> Tensor:
        g = self.group_at[j]
        code = torch.searchsorted(self.mid[:, g].contiguous(), w[:, None].contiguous())
        self.codes[:, j] = code[:, 0].to(torch.uint8)
        q = torch.gather(self.tables[:, g], 1, code)[:, 0]
        keep = self.kept[:, j]
        self.values[:, j] = torch.where(keep, w, 0.0)
        return torch.where(keep, w, q)


def _fit_tables(W: Tensor, F: Tensor, kept: Tensor, scheme: QuantScheme, config: SqueezeLLMConfig) -> Tensor:
    """Float16-exact sorted tables ``[R, G, K]``: per scale row, weighted k-means of its non-kept entries."""
    R, G = rows_shape(tuple(W.shape), scheme)  # per tensor: R = G = 1
    K = 2**scheme.bits
    x, f, k = W.reshape(R * G, -1), F.reshape(R * G, -1), kept.reshape(R * G, -1)
    # a floor keeps every entry in the fit where the Fisher is zero (a column no calibration token reached)
    f = f + 1e-6 * f.mean(1, keepdim=True) + torch.finfo(torch.float32).tiny
    f = f.masked_fill(k, 0.0)
    tables = weighted_kmeans(x, f, K, config.kmeans_iterations).half().float().sort(1).values
    return tables.reshape(R, G, K)


def squeeze_weights(weights: Sequence[Tensor], fishers: Sequence[Tensor], H: Tensor | None, scheme: QuantScheme,
                    config: SqueezeLLMConfig, layers: Sequence[str]) -> list[QuantizedWeight]:
    """SqueezeLLM (module docstring) for linears that read one input (so share ``H``, used only with
    ``config.error_feedback``), each with its Fisher ``[out, in]``."""
    if scheme.format is not FormatName.LUT:
        raise ValueError(f"squeezellm stores lookup tables: use --format lut (e.g. --format lut --bits 3 "
                         f"--per-channel), got {scheme.describe()}")
    if scheme.sparse:
        raise ValueError("squeezellm adds the sparse part itself (--outlier-fraction); the scheme must not be sparse")
    masks, tables = [], []
    for w, f, layer in zip(weights, fishers, layers):
        check_finite(w, layer)
        if tuple(f.shape) != tuple(w.shape):
            raise ValueError(f"Fisher of {layer} is {tuple(f.shape)}, expected the weight's shape {tuple(w.shape)}")
        R, G = rows_shape(tuple(w.shape), scheme, layer)  # a group size that does not divide: one line
        per_row = w.numel() // (R * G)
        if 2**scheme.bits > per_row:
            raise ValueError(f"{layer}: a table of {2**scheme.bits} levels for {per_row} weights per table does not "
                             "fit; use fewer --bits or larger tables (--per-channel)")
        mask = outlier_mask(w.float(), f.float(), config.outlier_fraction, config.sensitive_share)
        masks.append(mask)
        tables.append(_fit_tables(w.float(), f.float(), mask, scheme, config))
    feedback = config.error_feedback and H is not None
    outs = []
    if feedback:
        check_hessian(H, weights[0].shape[1], " + ".join(layers))
        codes_all, kept_values = _feedback_codes(weights, tables, masks, H, scheme, config, " + ".join(layers))
    start = 0
    for w, mask, table in zip(weights, masks, tables):
        rows = slice(start, start + w.shape[0])
        start += w.shape[0]
        R, G, K = table.shape
        if feedback:
            codes, values = codes_all[rows], kept_values[rows]
            if config.refine and G == 1 and R > 1:
                levels, codes = refit_levels(w.float(), codes, mask, values, table.reshape(R, K), H.float())
                table = levels.reshape(R, G, K)
        else:
            codes = nearest_level(w.float().reshape(R * G, -1), table.reshape(R * G, K)).reshape(w.shape).to(torch.uint8)
            values = w.float()
        qw = QuantizedWeight.from_codebook(codes, table.reshape(R * G, K), scheme)
        if mask.any():
            index = mask.reshape(-1).nonzero()[:, 0]
            dense = qw.dequantize().reshape(-1)[index]
            qw = qw.with_outliers(values.reshape(-1)[index] - dense, index)
        outs.append(qw)
    return outs


def _feedback_codes(weights: Sequence[Tensor], tables: list[Tensor], masks: list[Tensor], H: Tensor,
                    scheme: QuantScheme, config: SqueezeLLMConfig, layer: str) -> tuple[Tensor, Tensor]:
    """Codes ``[rows, in]`` (uint8) and the final values of the kept outliers (0 elsewhere) of the
    stacked weights, from GPTQ's column loop over their tables."""
    W = torch.cat([w.float() for w in weights])
    kept = torch.cat(masks)
    T = torch.cat([t.expand(w.shape[0], -1, -1) for t, w in zip(tables, weights)])  # [rows, G, K]
    H = H.to(dtype=torch.float32, copy=True)
    dead = H.diagonal() == 0
    H.diagonal().masked_fill_(dead, 1.0)
    W[:, dead] = 0.0
    n = W.shape[1]
    perm = (torch.argsort(H.diagonal(), descending=True, stable=True) if config.act_order
            else torch.arange(n, device=W.device))
    invperm = torch.argsort(perm)
    group_len = n // T.shape[1]
    Hinv = inverse_hessian_factor(H, GPTQConfig(damp=config.damp), layer, perm=perm)
    columns = _TableColumns(T, (perm // group_len).tolist(), kept[:, perm])
    gptq_column_loop(W[:, perm], Hinv, config.block_size, columns)
    return columns.codes[:, invperm], columns.values[:, invperm]


def refit_levels(W: Tensor, codes: Tensor, kept: Tensor, values: Tensor, levels: Tensor, H: Tensor) -> tuple[Tensor, Tensor]:
    """Each row's levels refitted to its codes: ``argmin_c (w - P c - v) H (w - P c - v)^T`` per row
    (``P``: the one-hot codes of the entries not kept, ``v``: the kept outliers' values), a small ridge
    towards the old levels keeping empty levels where they were. Per-row tables only
    (``W, codes, kept, values [rows, n]``, ``levels [rows, K]``). Returns float16-exact sorted levels
    and the codes renumbered to them."""
    rows, K = levels.shape
    P = torch.nn.functional.one_hot(codes.long(), K).float().masked_fill_(kept[..., None], 0.0)  # [rows, n, K]
    n = W.shape[1]
    HP = (H @ P.transpose(0, 1).reshape(n, rows * K)).reshape(n, rows, K).transpose(0, 1)  # [rows, n, K], one GEMM
    A = P.transpose(1, 2) @ HP  # [rows, K, K]
    b = (HP.transpose(1, 2) @ (W - values)[..., None])[..., 0]  # [rows, K]
    ridge = 1e-4 * H.diagonal().mean() + torch.finfo(torch.float32).tiny
    A.diagonal(dim1=1, dim2=2).add_(ridge)
    refit = torch.linalg.solve(A, b + ridge * levels).half().float()
    refit = torch.where(torch.isfinite(refit), refit, levels)
    sorted_levels, order = refit.sort(1)
    renumber = torch.argsort(order, 1)  # old code -> its position in the sorted table
    return sorted_levels, torch.gather(renumber, 1, codes.long()).to(torch.uint8)


@register_method("squeezellm", config=SqueezeLLMConfig, statistics=[Statistic.FISHER, Statistic.HESSIAN],
                 summary="Fisher-weighted k-means levels per row (lut) + exact sparse outliers, GPTQ error feedback")
def _solve_squeezellm(weights: Sequence[Tensor], scheme: QuantScheme, config: SqueezeLLMConfig,
                      statistics: InputStatistics, layers: Sequence[str]) -> list[QuantizedWeight]:
    if "fisher" not in statistics:
        raise ValueError(f"squeezellm needs the Fisher information of {', '.join(layers)}: run it through the "
                         "calibrated pipeline (lowbit quantize ... --method squeezellm, with calibration data)")
    fisher = statistics["fisher"]
    fishers, start = [], 0
    for w in weights:
        fishers.append(fisher[start:start + w.shape[0]])
        start += w.shape[0]
    if start != fisher.shape[0]:
        raise ValueError(f"the Fisher has {fisher.shape[0]} rows, the weights of {', '.join(layers)} {start}")
    return squeeze_weights(weights, fishers, statistics.get("hessian"), scheme, config, layers)

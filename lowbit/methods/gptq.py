"""GPTQ: quantize a weight column by column, pushing each column's rounding error onto the columns
not yet quantized, so that the layer's output on the calibration inputs changes as little as possible.

Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers" (ICLR 2023), Algorithm 1; the code follows IST-DASLab/gptq ``gptq.py``
(``GPTQ.add_batch``, ``GPTQ.fasterquant``). With ``H = 2 X^T X / n`` (the Hessian of the layer's
squared output error, the same for every output row) and ``Hinv`` the upper Cholesky factor of
``H^-1``, quantizing column ``i`` to ``q`` moves the columns after it by
``W[:, i+1:] -= (w - q) / Hinv[i, i] * Hinv[i, i+1:]`` (the OBS update). Updates are lazy: inside a
block of ``block_size`` columns they are rank-1 updates, to the columns after the block one matmul.

Free functions on tensors, no hooks: a calibration pipeline calls ``accumulate_hessian`` on each
batch of a layer's inputs, then ``gptq_quantize`` on the layer's weight. ``gptq_column_loop`` is
the algorithm for any grid; the scalar grids of ``QuantScheme`` and GGUF's block grids
(``lowbit.gguf.gptq_blocks``) differ only in the ``ColumnQuantizer`` they pass it. Registered as
method ``gptq``, which declares the Hessian and solves linears that share it in one column loop.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from lowbit.formats import NumberFormat
from lowbit.formats.integer import IntFormat
from lowbit.methods.registry import InputStatistics, Statistic, register_method
from lowbit.methods.rtn import check_finite, row_params
from lowbit.quantizer import dequantize_rows, quantize_rows, rows_shape, weight_rows
from lowbit.qweight import QuantizedWeight
from lowbit.scheme import Granularity, QuantScheme, ZeroPoint


@torch.no_grad()
def accumulate_hessian(H: Tensor | None, x: Tensor, n_seen: int) -> tuple[Tensor, int]:
    """Fold one batch of a layer's inputs into the running mean ``H = 2 X^T X / n``.

    Args:
        H: float32 ``[in, in]`` from the previous call, updated in place; None before the first batch.
        x: ``[..., in_features]`` activations of one batch, any float dtype; every leading index
            (batch, position) is one sample.
        n_seen: samples already in ``H`` (0 when ``H`` is None).

    Returns:
        ``(H, n_seen + samples in x)``; the mean weights every sample equally, whatever the batching.

    Raises:
        ValueError: ``x``'s last dimension does not match ``H``, or ``n_seen`` does not fit ``H``.
    """
    in_features = x.shape[-1]
    x = x.reshape(-1, in_features).float()
    if H is None:
        if n_seen != 0:
            raise ValueError(f"n_seen must be 0 when H is None (no batch seen yet), got {n_seen}")
        H = torch.zeros(in_features, in_features, dtype=torch.float32, device=x.device)
    elif tuple(H.shape) != (in_features, in_features):
        raise ValueError(f"activations have {in_features} features but the Hessian is {tuple(H.shape)}; "
                         "pass the inputs of the same layer to every call")
    if n_seen < 0:
        raise ValueError(f"n_seen must be >= 0, got {n_seen}")
    total = n_seen + x.shape[0]
    if total == n_seen:
        return H, n_seen
    # IST's add_batch: H *= n / (n + m); H += 2/(n + m) x^T x
    H.mul_(n_seen / total).addmm_(x.T, x, alpha=2.0 / total)
    return H, total


@dataclass(frozen=True)
class GPTQConfig:
    """The knobs of ``gptq_quantize``; defaults are IST-DASLab/gptq's, except act order, on by default
    as in llm-compressor and GPTQModel (it roughly halved RTN's KL on SmolLM2 at int4 per channel,
    and with static groups the stored layout is the natural one, so inference pays nothing).

    static_groups matters only with act_order and group granularity. Without it, a group's scale is
    computed when its first column in act order is reached, from the current (error-updated)
    weights of all its columns, which are then all still unquantized; the stored layout stays the
    natural one either way (no ``g_idx``).
    """

    damp: float = 0.01  # fraction of mean diag(H) added to the diagonal (IST percdamp)
    block_size: int = 128  # lazy batch update width; changes speed, not the result
    act_order: bool = True  # quantize columns in order of decreasing diag(H)
    static_groups: bool = True  # with act_order: group scales up front from the original weights
    max_damp_retries: int = 6  # on a non-positive-definite H: damp *= 10, warn, retry this often

    def __post_init__(self) -> None:
        if not self.damp > 0:
            raise ValueError(f"damp must be > 0 (a fraction of mean diag(H), e.g. 0.01), got {self.damp!r}")
        if not (isinstance(self.block_size, int) and self.block_size >= 1):
            raise ValueError(f"block_size must be an int >= 1 (e.g. 128), got {self.block_size!r}")
        if not (isinstance(self.max_damp_retries, int) and self.max_damp_retries >= 0):
            raise ValueError(f"max_damp_retries must be an int >= 0, got {self.max_damp_retries!r}")


@torch.no_grad()
def gptq_quantize(weight: Tensor, H: Tensor, scheme: QuantScheme, config: GPTQConfig = GPTQConfig(), *,
                  layer: str = "weight") -> QuantizedWeight:
    """Quantize ``weight [out, in]`` with GPTQ given its inputs' Hessian ``H [in, in]``.

    Scales: per tensor and per channel from the whole weight (``scheme.observer``, as RTN); per
    group from the group's current error-updated weights when the first of its columns is reached,
    or, with ``act_order`` and ``static_groups``, from the original weights up front. Columns that
    never see input (``H[i, i] == 0``) are set to zero before anything else. Computed in float32
    on ``weight``'s device; deterministic. ``H`` is not modified.

    Returns:
        A ``QuantizedWeight`` in the natural column order, whatever ``act_order``.

    Raises:
        ValueError: NaN/Inf in ``weight`` or ``H``, a shape mismatch, a group size that does not
            divide ``in_features``, or an ``H`` still not positive definite after
            ``config.max_damp_retries`` tenfold increases of the dampening (each retry warns).
    """
    _check_weights([weight], [layer], scheme)
    return _solve([weight], H, scheme, config, [layer])[0]


@torch.no_grad()
def gptq_quantize_shared(weights: Sequence[Tensor], H: Tensor, scheme: QuantScheme,
                         config: GPTQConfig = GPTQConfig(), *, layers: Sequence[str]) -> list[QuantizedWeight]:
    """``gptq_quantize`` for linears that read the same input (q/k/v, gate/up) and so share ``H``.

    GPTQ's update of a weight row depends only on that row and ``H``, so the rows of all the
    weights go through one column loop (one Cholesky, a third of the per-column overhead for
    q/k/v); each row gets exactly what a separate call would give it, up to float summation
    order. Per-tensor scales are whole-tensor statistics, so that granularity solves each weight
    on its own.
    """
    _check_weights(weights, layers, scheme)
    if scheme.granularity is Granularity.TENSOR:
        return [_solve([w], H, scheme, config, [name])[0] for w, name in zip(weights, layers)]
    return _solve(weights, H, scheme, config, layers)


def _check_weights(weights: Sequence[Tensor], layers: Sequence[str], scheme: QuantScheme) -> None:
    if len(weights) != len(layers) or not weights:
        raise ValueError(f"need one layer name per weight, got {len(weights)} weights and {len(layers)} names")
    for weight, layer in zip(weights, layers):
        check_finite(weight, layer)
        if weight.dim() != 2 or weight.shape[1] != weights[0].shape[1]:
            raise ValueError(f"{layer}: expected a 2-D weight [out, {weights[0].shape[1]}] (the input size of "
                             f"{layers[0]}, which shares its Hessian), got shape {tuple(weight.shape)}")
        rows_shape(tuple(weight.shape), scheme, layer)  # raises on a group size that does not divide


def _solve(weights: Sequence[Tensor], H: Tensor, scheme: QuantScheme, config: GPTQConfig,
           layers: Sequence[str]) -> list[QuantizedWeight]:
    """GPTQ on the rows of ``weights`` stacked, split back into one ``QuantizedWeight`` each."""
    layer = " + ".join(layers)
    check_hessian(H, weights[0].shape[1], layer)
    fmt = scheme.number_format()
    W = torch.cat([w.float() for w in weights]) if len(weights) > 1 else weights[0].float().clone()
    R, G = rows_shape(tuple(W.shape), scheme, layer)
    dead = (H.diagonal() == 0).to(W.device)  # inputs never seen: their columns are set to zero
    W[:, dead] = 0.0

    n = W.shape[1]
    diag = H.diagonal().to(W.device, torch.float32).masked_fill(dead, 1.0)
    perm = (torch.argsort(diag, descending=True, stable=True) if config.act_order
            else torch.arange(n, device=W.device))
    invperm = torch.argsort(perm)
    group_len = n // G
    lazy = scheme.granularity is Granularity.GROUP and not (config.act_order and config.static_groups)
    params = _GroupParams.pending_all(W, G, R, scheme) if lazy else _GroupParams.up_front(W, fmt, scheme, G)
    positions = [invperm[g * group_len:(g + 1) * group_len] for g in range(G)]  # of each group's columns
    group_at = (perm // group_len).tolist()

    Hinv = inverse_hessian_factor(H.to(W.device), config, layer, perm=perm)
    columns = _GridColumns(W, params, group_at, positions, fmt, scheme)
    gptq_column_loop(W[:, perm], Hinv, config.block_size, columns)
    codes, scale = columns.codes()[:, invperm], params.scale.T
    zero = None if params.zero is None else params.zero.T
    out, start = [], 0
    for w in weights:
        rows = slice(start, start + w.shape[0]) if R > 1 else slice(None)  # per tensor: one row of scales
        out.append(QuantizedWeight.from_codes(codes[start:start + w.shape[0]], scale[rows],
                                              None if zero is None else zero[rows], scheme))
        start += w.shape[0]
    return out


def check_hessian(H: Tensor, in_features: int, layer: str) -> None:
    """``ValueError`` naming ``layer`` unless ``H`` is a finite ``[in_features, in_features]`` tensor."""
    if not isinstance(H, Tensor) or tuple(H.shape) != (in_features, in_features):
        shape = tuple(H.shape) if isinstance(H, Tensor) else type(H).__name__
        raise ValueError(f"Hessian of {layer} must be [{in_features}, {in_features}] (in_features squared), "
                         f"got {shape}")
    bad = int((~torch.isfinite(H)).sum())
    if bad:
        raise ValueError(f"Hessian of {layer} has {bad} NaN/Inf values; the calibration activations "
                         "overflowed (run the model in float32 or check its inputs)")


@dataclass
class _GroupParams:
    """Scale and zero (None when symmetric) of every group, ``[G, R]`` so a group's are contiguous.

    ``pending`` holds the groups whose parameters are still to come from the current weights.
    """

    scale: Tensor
    zero: Tensor | None
    pending: set[int]

    @classmethod
    def up_front(cls, W: Tensor, fmt: NumberFormat, scheme: QuantScheme, G: int) -> _GroupParams:
        scale, zero = row_params(weight_rows(W, scheme), scheme)
        return cls(scale.view(-1, G).T.contiguous(), None if zero is None else zero.view(-1, G).T.contiguous(), set())

    @classmethod
    def pending_all(cls, W: Tensor, G: int, R: int, scheme: QuantScheme) -> _GroupParams:
        zero = W.new_zeros(G, R) if scheme.has_zero else None
        return cls(W.new_zeros(G, R), zero, set(range(G)))

    def set(self, g: int, scale: Tensor, zero: Tensor | None) -> None:
        self.scale[g] = scale
        if zero is not None:
            self.zero[g] = zero
        self.pending.discard(g)


def inverse_hessian_factor(H: Tensor, config: GPTQConfig, layer: str, *, perm: Tensor | None = None) -> Tensor:
    """Upper Cholesky factor of ``(Hp + damp * mean(diag Hp) * I)^-1``, as IST computes it, where ``Hp`` is
    ``H[perm][:, perm]`` (``H`` when ``perm`` is None) with its zero diagonal entries (inputs never
    seen) set to 1. ``H`` is not modified.

    Memory: besides ``H``, two ``[n, n]`` float32 buffers at the peak (the Cholesky factor and
    ``cholesky_inverse``'s result); the permuted, damped copy is built in the factor's buffer, a few
    columns at a time, and each factorization runs in place. For a 8960-wide ``down_proj`` that is
    642 MB; ``H[perm][:, perm]``, its damped clone and the factors taken apart peaked at five to six
    copies (1.6-1.9 GB; ``tests/methods/test_gptq.py`` measures both). The buffers are column-major, the layout LAPACK works in and the one
    ``torch.linalg.cholesky_ex`` gives its results, so every value is the same as those of the
    out-of-place calls.

    While ``Hp + damp I`` (or its inverse, numerically) is not positive definite, ``damp`` grows tenfold,
    with a warning, at most ``config.max_damp_retries`` times; then ``ValueError``.
    """
    damp = config.damp
    mean_diag = None
    perm = None if perm is None else perm.to(H.device)
    info = torch.empty((), dtype=torch.int32, device=H.device)
    for attempt in range(config.max_damp_retries + 1):
        L = _permuted_column_major(H, perm)
        L.diagonal().masked_fill_(L.diagonal() == 0, 1.0)
        if mean_diag is None:
            mean_diag = L.diagonal().mean()
        L.diagonal().add_(damp * mean_diag)
        torch.linalg.cholesky_ex(L, out=(L, info))  # in place: the damped copy becomes its lower factor
        factored = info.item() == 0
        C = torch.cholesky_inverse(L) if factored else None  # column-major, the layout cholesky_ex takes
        del L
        if C is not None:
            torch.linalg.cholesky_ex(C, upper=True, out=(C, info))
            if info.item() == 0:
                return C
            del C
        if attempt < config.max_damp_retries:
            warnings.warn(f"Hessian of {layer} is not positive definite with damp={damp:g}; "
                          f"retrying with damp={damp * 10:g}", stacklevel=5)  # the caller of gptq_quantize(_shared)
        damp *= 10
    raise ValueError(
        f"Hessian of {layer} stays singular after {config.max_damp_retries} dampening retries "
        f"(damp up to {damp / 10:g} of mean diag(H) = {mean_diag.item():g}); its calibration inputs "
        "are degenerate or H is not 2 X^T X of real activations"
    )


def _permuted_column_major(H: Tensor, perm: Tensor | None, chunk: int = 256) -> Tensor:
    """A float32 column-major (``.mT`` of a contiguous tensor) copy of ``H[perm][:, perm]``, filled
    ``chunk`` columns at a time, so no full-size temporary exists beside it."""
    n = H.shape[0]
    storage = torch.empty(n, n, dtype=torch.float32, device=H.device)  # row c holds column c
    for c in range(0, n, chunk):
        if perm is None:
            columns = H[:, c:c + chunk]
        else:
            columns = H.index_select(1, perm[c:c + chunk]).index_select(0, perm)
        storage[c:c + chunk] = columns.T
    return storage.mT


class ColumnQuantizer(Protocol):
    """What differs between grids in GPTQ's column loop: how one column's values are chosen."""

    def __call__(self, j: int, w: Tensor, current: Callable[[Tensor | slice], Tensor]) -> Tensor:
        """Quantize the ``j``-th column in processing order, whose error-updated values are ``w [rows]``
        (not to be modified), and return its quantized values ``q [rows]``. A grid fitted to the
        data reads the error-updated values of columns not yet quantized with ``current``: positions
        ``[k]`` (or a slice) -> ``[rows, k]`` (a view, not to be modified, for a slice that lies in
        the current lazy batch)."""
        ...


class _LazyBatch:
    """The current lazy batch of the column loop: ``W1`` (columns ``i1..`` with every update so far)
    and ``U1`` (the scaled errors of its first ``done`` columns, not yet applied after the batch)."""

    def __init__(self, W: Tensor, W1: Tensor, U1: Tensor, HinvN: Tensor, i1: int) -> None:
        self.W, self.W1, self.U1, self.HinvN, self.i1 = W, W1, U1, HinvN, i1
        self.done = 0

    def current(self, P: Tensor | slice) -> Tensor:
        """Error-updated weights ``[out, len(P)]`` of the not yet quantized columns at positions ``P``.

        Columns inside the batch have every update so far; those after it still lack the lazy
        update from the batch's first ``done`` columns, added here.
        """
        end = self.i1 + self.W1.shape[1]
        if isinstance(P, slice):
            if P.start >= self.i1 and P.stop <= end:
                return self.W1[:, P.start - self.i1:P.stop - self.i1]
            P = torch.arange(P.start, P.stop, device=self.W.device)
        inside = P < end
        if bool(inside.all()):
            return self.W1[:, P - self.i1]
        cur = self.W[:, P] - self.U1[:, :self.done] @ self.HinvN[self.i1:self.i1 + self.done, P]
        cur[:, inside] = self.W1[:, P[inside] - self.i1]
        return cur


def gptq_column_loop(W: Tensor, Hinv: Tensor, block_size: int, quantize_column: ColumnQuantizer) -> None:
    """GPTQ's loop over the columns of ``W [rows, n]`` in processing order, for any grid:
    ``quantize_column`` chooses each column's values (a scalar grid's scales and codes, a GGUF
    block's parameters) and keeps what it needs of them. ``W`` is scratch space: the loop writes the
    lazy updates into it, so its contents afterwards are neither the input nor the result.

    ``Hinv`` is the upper Cholesky factor of ``H^-1`` in the same order (``inverse_hessian_factor``);
    it is consumed: its rows are divided by their diagonal in place. The OBS update
    ``W[:, j>i] -= (w - q) / Hinv[i, i] * Hinv[i, j>i]`` is applied with the rows of ``Hinv``
    pre-divided by their diagonal (``HinvN``), which saves one op per column; inside a lazy batch of
    ``block_size`` columns as rank-1 updates, to the columns after it as one matmul.
    """
    n = W.shape[1]
    HinvN = Hinv.div_(Hinv.diagonal().clone()[:, None])  # in place: Hinv is as large as H
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        W1 = W[:, i1:i2].clone()
        U1 = torch.empty_like(W1)
        HinvN1 = HinvN[i1:i2, i1:i2]
        batch = _LazyBatch(W, W1, U1, HinvN, i1)
        for i in range(i2 - i1):
            batch.done = i
            w = W1[:, i]
            q = quantize_column(i1 + i, w, batch.current)
            u = torch.sub(w, q, out=U1[:, i])
            W1[:, i + 1:].addr_(u, HinvN1[i, i + 1:], alpha=-1.0)
        W[:, i2:].addmm_(U1, HinvN[i1:i2, i2:], alpha=-1.0)


class _ColumnRounder:
    """Quantize one column ``w [out]`` under per-row ``scale``/``zero`` in as few tensor ops as possible.

    GPTQ's inner loop runs once per input column, so per-op overhead, not arithmetic, sets its
    speed. For the integer grid the rounding is written out (the same operations, in the same
    order, as ``quantize_rows`` then ``dequantize_rows``, so results are identical); other formats
    go through ``encode``/``decode``. ``__call__`` returns ``(stored, q)``: what to keep for the
    codes (the clamped integer, or the code itself) and the dequantized value.
    """

    def __init__(self, fmt: NumberFormat, scheme: QuantScheme) -> None:
        self.fmt, self.scheme = fmt, scheme
        self.int_grid = isinstance(fmt, IntFormat)
        self.float_zero = scheme.has_zero and scheme.zero_point is ZeroPoint.FLOAT

    def __call__(self, w: Tensor, scale: Tensor, zero: Tensor | None) -> tuple[Tensor, Tensor]:
        if not self.int_grid:
            c = quantize_rows(w[:, None], scale, zero, self.fmt, self.scheme)
            return c[:, 0], dequantize_rows(c, scale, zero, self.fmt, self.scheme)[:, 0]
        lo, hi = self.fmt.qmin, self.fmt.qmax
        if zero is None:
            r = torch.round(w / scale).clamp_(lo, hi)
            return r, r * scale
        if self.float_zero:
            r = torch.round((w - zero) / scale).clamp_(lo, hi)
            return r, r * scale + zero
        r = torch.round(w / scale + zero).clamp_(lo, hi)
        return r, (r - zero) * scale

    def codes(self, stored: Tensor) -> Tensor:
        """uint8 codes from what ``__call__`` stored, column by column."""
        return (stored + self.fmt.offset).to(torch.uint8) if self.int_grid else stored.to(torch.uint8)


class _GridColumns:
    """``ColumnQuantizer`` of a scalar grid: per-row ``scale``/``zero`` of the column's group, a pending
    group's from its current weights when its first column comes up; keeps the codes.

    ``group_at[j]`` is the group of the column at position ``j``, ``positions[g]`` the positions of
    group ``g``'s columns.
    """

    def __init__(self, W: Tensor, params: _GroupParams, group_at: list[int], positions: list[Tensor],
                 fmt: NumberFormat, scheme: QuantScheme) -> None:
        self.params, self.group_at, self.positions, self.scheme = params, group_at, positions, scheme
        self.rounder = _ColumnRounder(fmt, scheme)
        self.stored = torch.empty(W.shape, dtype=torch.float32, device=W.device)
        self.group = -1
        self.scale: Tensor | None = None
        self.zero: Tensor | None = None

    def __call__(self, j: int, w: Tensor, current: Callable[[Tensor | slice], Tensor]) -> Tensor:
        g = self.group_at[j]
        if g != self.group:
            if g in self.params.pending:
                self.params.set(g, *row_params(current(self.positions[g]), self.scheme))
            self.scale, self.zero = self.params.scale[g], None if self.params.zero is None else self.params.zero[g]
            self.group = g
        self.stored[:, j], q = self.rounder(w, self.scale, self.zero)
        return q

    def codes(self) -> Tensor:
        """uint8 codes ``[rows, n]`` in processing order."""
        return self.rounder.codes(self.stored)


@register_method("gptq", config=GPTQConfig, statistics=[Statistic.HESSIAN],
                 summary="column by column, each rounding error pushed onto the columns left (Hessian)")
def _solve_gptq(weights: Sequence[Tensor], scheme: QuantScheme, config: GPTQConfig, statistics: InputStatistics,
                layers: Sequence[str]) -> list[QuantizedWeight]:
    return gptq_quantize_shared(weights, statistics["hessian"], scheme, config, layers=layers)

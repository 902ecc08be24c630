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
batch of a layer's inputs, then ``gptq_quantize`` on the layer's weight. Not in the method registry,
whose methods take no calibration statistics.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from lowbit.formats import NumberFormat
from lowbit.methods.rtn import check_finite
from lowbit.observers import observe_range
from lowbit.quantizer import dequantize_rows, fake_quantizer, qparams, quantize_rows, rows_shape, weight_rows
from lowbit.qweight import QuantizedWeight
from lowbit.scheme import Granularity, QuantScheme


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
    """The knobs of ``gptq_quantize``; defaults are IST-DASLab/gptq's.

    static_groups matters only with act_order and group granularity. Without it, a group's scale is
    computed when its first column in act order is reached, from the current (error-updated)
    weights of all its columns, which are then all still unquantized; the stored layout stays the
    natural one either way (no ``g_idx``).
    """

    damp: float = 0.01  # fraction of mean diag(H) added to the diagonal (IST percdamp)
    block_size: int = 128  # lazy batch update width; changes speed, not the result
    act_order: bool = False  # quantize columns in order of decreasing diag(H)
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
    check_finite(weight, layer)
    if weight.dim() != 2:
        raise ValueError(f"{layer}: expected a 2-D weight [out, in], got shape {tuple(weight.shape)}")
    R, G = rows_shape(tuple(weight.shape), scheme, layer)  # raises on a group size that does not divide
    in_features = weight.shape[1]
    _check_hessian(H, in_features, layer)
    fmt = scheme.number_format()
    W = weight.float().clone()
    H = H.to(device=W.device, dtype=torch.float32, copy=True)
    dead = H.diagonal() == 0
    H.diagonal().masked_fill_(dead, 1.0)
    W[:, dead] = 0.0

    n = in_features
    perm = (torch.argsort(H.diagonal(), descending=True, stable=True) if config.act_order
            else torch.arange(n, device=W.device))
    invperm = torch.argsort(perm)
    group_len = n // G
    lazy = scheme.granularity is Granularity.GROUP and not (config.act_order and config.static_groups)
    params = _GroupParams.pending_all(W, G, R, scheme) if lazy else _GroupParams.up_front(W, fmt, scheme, G)
    positions = [invperm[g * group_len:(g + 1) * group_len] for g in range(G)]  # of each group's columns
    group_at = (perm // group_len).tolist()

    Hinv = _inverse_hessian_factor(H[perm][:, perm], config, layer)
    codes = _quantize_columns(W[:, perm], Hinv, group_at, positions, params, fmt, scheme, config.block_size)
    zero = None if params.zero is None else params.zero.T
    return QuantizedWeight.from_codes(codes[:, invperm], params.scale.T, zero, scheme)


def _check_hessian(H: Tensor, in_features: int, layer: str) -> None:
    if not isinstance(H, Tensor) or tuple(H.shape) != (in_features, in_features):
        shape = tuple(H.shape) if isinstance(H, Tensor) else type(H).__name__
        raise ValueError(f"Hessian of {layer} must be [{in_features}, {in_features}] (in_features squared), "
                         f"got {shape}")
    bad = int((~torch.isfinite(H)).sum())
    if bad:
        raise ValueError(f"Hessian of {layer} has {bad} NaN/Inf values; the calibration activations "
                         "overflowed (run the model in float32 or check its inputs)")


def _range_params(rows: Tensor, fmt: NumberFormat, scheme: QuantScheme) -> tuple[Tensor, Tensor | None]:
    """Scale and zero per row of ``rows [r, n]``, the range chosen by the scheme's observer (as RTN)."""
    lo, hi = observe_range(rows, scheme.observer, symmetric=scheme.symmetric,
                           fake_quant=fake_quantizer(fmt, scheme), levels=2**scheme.bits)
    return qparams(lo, hi, fmt, scheme)


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
        scale, zero = _range_params(weight_rows(W, scheme), fmt, scheme)
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


def _inverse_hessian_factor(H: Tensor, config: GPTQConfig, layer: str) -> Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``, as IST computes it.

    While ``H + damp I`` (or its inverse, numerically) is not positive definite, ``damp`` grows tenfold,
    with a warning, at most ``config.max_damp_retries`` times; then ``ValueError``.
    """
    mean_diag = H.diagonal().mean()
    damp = config.damp
    for attempt in range(config.max_damp_retries + 1):
        Hd = H.clone()
        Hd.diagonal().add_(damp * mean_diag)
        L, info = torch.linalg.cholesky_ex(Hd)
        if info.item() == 0:
            Hinv, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info.item() == 0:
                return Hinv
        if attempt < config.max_damp_retries:
            warnings.warn(f"Hessian of {layer} is not positive definite with damp={damp:g}; "
                          f"retrying with damp={damp * 10:g}", stacklevel=4)  # the caller of gptq_quantize
        damp *= 10
    raise ValueError(
        f"Hessian of {layer} stays singular after {config.max_damp_retries} dampening retries "
        f"(damp up to {damp / 10:g} of mean diag(H) = {mean_diag.item():g}); its calibration inputs "
        "are degenerate or H is not 2 X^T X of real activations"
    )


def _current_columns(W: Tensor, W1: Tensor, Err1: Tensor, Hinv: Tensor, i1: int, P: Tensor) -> Tensor:
    """Error-updated weights ``[out, len(P)]`` of the not yet quantized columns at positions ``P``.

    Columns inside the block (``W1``, starting at ``i1``) have every update so far; those after it
    still lack the lazy update from the block's first ``Err1.shape[1]`` columns, added here.
    """
    inside = P < i1 + W1.shape[1]
    if bool(inside.all()):
        return W1[:, P - i1]
    i = Err1.shape[1]
    cur = W[:, P] - Err1 @ Hinv[i1:i1 + i, P]
    cur[:, inside] = W1[:, P[inside] - i1]
    return cur


def _quantize_columns(W: Tensor, Hinv: Tensor, group_at: list[int], positions: list[Tensor],
                      params: _GroupParams, fmt: NumberFormat, scheme: QuantScheme, block_size: int) -> Tensor:
    """GPTQ's loop over ``W [out, n]`` in processing order (updated in place) -> uint8 codes ``[out, n]``.

    ``group_at[j]`` is the group of the column at position ``j``, ``positions[g]`` the positions of
    group ``g``'s columns; a pending group gets its parameters when its first column comes up.
    """
    out_features, n = W.shape
    codes = torch.empty(out_features, n, dtype=torch.uint8, device=W.device)
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            g = group_at[i1 + i]
            if g in params.pending:
                cur = _current_columns(W, W1, Err1[:, :i], Hinv, i1, positions[g])
                params.set(g, *_range_params(cur, fmt, scheme))
            scale, zero = params.scale[g], None if params.zero is None else params.zero[g]
            w = W1[:, i]
            c = quantize_rows(w[:, None], scale, zero, fmt, scheme)
            q = dequantize_rows(c, scale, zero, fmt, scheme)[:, 0]
            codes[:, i1 + i] = c[:, 0]
            err1 = (w - q) / Hinv1[i, i]
            W1[:, i + 1:].addr_(err1, Hinv1[i, i + 1:], alpha=-1.0)
            Err1[:, i] = err1
        W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1.0)
    return codes

"""Sensitivity: the output error each candidate would cause in each tensor, from calibration statistics.

The proxy is GPTQ's objective with the Hessian's diagonal, weighted by how much the loss cares about
each output: ``E = sum_j F_j sum_i dW_ji^2 H_ii`` with ``H_ii = 2 mean(x_i^2)`` the diagonal of the
layer's input Hessian ``2 X^T X / n``, ``dW`` the candidate's round-trip error (RTN for a lowbit
scheme, the importance-weighted block search for a GGUF type) and ``F_j`` the mean squared gradient
of the language-model loss with respect to output ``j`` of the layer (the diagonal empirical Fisher
of the outputs): a second-order estimate of the loss increase. Unweighted, the error cannot compare
layers: an early layer's outputs are small beside the residual stream they join, so its errors look
cheap while they travel through every later block (on SmolLM2 it gave block 0 two bits).

Why the diagonal: a round trip's errors are nearly independent across input columns, so the
off-diagonal terms of ``tr(dW H dW^T)`` average out, and the diagonal needs no ``[in, in]``
product per (tensor, candidate) nor a second calibration pass. Both statistics come from one forward
and backward pass over a few windows, which is what keeps the allocation a small fraction of a GPTQ
quantization's time. On SmolLM2 (``bench/mixed_precision.py --parts proxy``) the diagonal ranks 21
tensors against their measured one-at-a-time KL about as well as the full Hessian does.

When the final method is GPTQ, the proxy weighs each column by what GPTQ leaves of its error
instead of ``H_ii``: GPTQ quantizes the columns one after another (in act order) and folds each
column's rounding error into the columns not yet quantized, so a column's error costs
``dW_ji^2 / U_ii^2`` with ``U`` the upper Cholesky factor of the damped ``H^-1`` in that order (the
Optimal Brain Quantizer's loss of one step, Frantar et al. 2022), ``H`` the full input Hessian. How
much GPTQ cuts RTN's error differs between tensors by a factor of twenty: on SmolLM2 (int3 g64,
``bench/mixed_precision.py --parts gptq_proxy``, GPTQ fitted on 32 calibration windows, the cut
measured on 8 WikiText-2 test windows) from 0.026 for block 0's ``o_proj`` to 0.52 for block 15's
``down_proj``. The formula ranks those cuts at Spearman 0.85 over three blocks' 21 tensors with
Hessians from 16 windows, 0.78 from 8 and 0.63 from 4 (GPTQ over-fits so few); 8 is the default,
the most the allocation's time allows. The full Hessians are accumulated over forward passes only,
as many tensors per pass as ``HESSIAN_MEMORY_BYTES`` holds.

A candidate whose round trip leaves a tensor (nearly) unchanged re-hits the grid the float weights
came from (the demo models are dequantized GGUF files): it is excluded for every tensor, since it
would look lossless for the wrong reason.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lowbit.auto.candidates import Candidate
from lowbit.methods.gptq import GPTQConfig
from lowbit.pipeline.architectures import architecture_for
from lowbit.pipeline.sequential import linear_weight

# Relative Frobenius error below which a round trip counts as re-hitting the source grid; 8-bit
# round trips of the demo models are ~5e-3, float16 rounding of a re-hit grid ~1e-4.
SOURCE_GRID_RTOL = 1e-3
# Windows of the forward and backward pass. The Fisher and the input moments are per-output and
# per-input averages, stable on few windows; on SmolLM2 one window costs about as much as 1/20 of a
# GPTQ quantization's calibration, so 4 keep the allocation under a tenth of it.
PROXY_WINDOWS = 4
# Windows of the forward passes for the full Hessians of the GPTQ-aware proxy (see above): each costs
# about a tenth of the allocation's time on SmolLM2, so 8 keep it under a tenth of GPTQ's.
GPTQ_PROXY_WINDOWS = 8
# Full Hessians held at once while they are accumulated: more tensors than fit take further passes.
HESSIAN_MEMORY_BYTES = 1 << 30


@dataclass
class Option:
    """One candidate for one tensor: its exact stored bits, its proxy error (Fisher-weighted) and the
    unweighted ``sum_i dW_ji^2 H_ii`` beside it (reported, not optimised)."""

    candidate: Candidate
    bits: int
    error: float
    raw_error: float


@dataclass
class TensorSensitivity:
    """Every fitting candidate of one tensor, cheapest first, and the candidates skipped with why."""

    name: str
    shape: tuple[int, int]
    options: list[Option] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def weights(self) -> int:
        return self.shape[0] * self.shape[1]


@dataclass
class LossStatistics:
    """What the proxy knows of one linear: ``fisher`` float32 ``[out]``, the mean over tokens of the
    squared gradient of the loss with respect to each output; ``input_sq`` float32 ``[in]``, the mean
    over tokens of each input squared (llama.cpp's importance matrix; ``2 * input_sq`` is the diagonal
    of the input Hessian); ``column_weights`` float32 ``[in]``, what a squared rounding error in each
    input column costs after the final method's error feedback (``gptq_column_weights``), or None
    for a method without it (the Hessian's diagonal is the cost then)."""

    fisher: Tensor
    input_sq: Tensor
    column_weights: Tensor | None = None

    @property
    def hessian_diagonal(self) -> Tensor:
        return 2 * self.input_sq

    @property
    def error_weights(self) -> Tensor:
        """Per input column, the cost of a squared rounding error there."""
        return self.hessian_diagonal if self.column_weights is None else self.column_weights


def output_errors(delta: Tensor, column_weights: Tensor) -> Tensor:
    """``sum_i dW_ji^2 c_i``: per output of ``delta`` ``[out, in]`` its error with each input column's
    squared error costing ``column_weights`` ``[in]`` (the Hessian's diagonal, or what GPTQ leaves
    of it: ``LossStatistics.error_weights``), float64."""
    return (delta.pow(2) * column_weights).sum(1, dtype=torch.float64)


def loss_statistics(model: nn.Module, windows: Tensor, names: Sequence[str]) -> dict[str, LossStatistics]:
    """``LossStatistics`` of every linear in ``names`` (full module names) from one forward and
    backward pass of the next-token loss per window of ``windows`` (int64 ``[n, seqlen]``).

    Gradients flow to activations only: the parameters get none (no float copy of their gradients,
    and the model is left as it was).
    """
    grads: dict[str, Tensor] = {}
    inputs: dict[str, Tensor] = {}
    handles = []

    def add(sums: dict[str, Tensor], name: str, x: Tensor) -> None:
        sq = x.detach().float().pow(2).reshape(-1, x.shape[-1]).sum(0)
        sums[name] = sq if name not in sums else sums[name] + sq

    def watch(name: str):
        def before(module: nn.Module, args: Any) -> None:
            add(inputs, name, args[0])

        def after(module: nn.Module, args: Any, out: Tensor) -> None:
            if out.requires_grad:
                out.register_hook(lambda g: add(grads, name, g))
        return before, after

    def leaf(module: nn.Module, args: Any, out: Tensor) -> Tensor:
        return out.detach().requires_grad_(True)

    handles.append(model.get_input_embeddings().register_forward_hook(leaf))
    for n in names:
        before, after = watch(n)
        module = model.get_submodule(n)
        handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    was_training = model.training
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.eval()
    tokens = 0
    try:
        for p in trainable:  # the graph starts at the embedding's output: no parameter gradients
            p.requires_grad_(False)
        with torch.enable_grad():
            for window in windows:
                ids = window[None]
                model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
                tokens += ids.numel()
    finally:
        for h in handles:
            h.remove()
        for p in trainable:
            p.requires_grad_(True)
        model.train(was_training)
    return {n: LossStatistics(grads[n] / tokens, inputs[n] / tokens) for n in names}


def gptq_column_weights(H: Tensor, config: GPTQConfig = GPTQConfig()) -> Tensor:
    """Per input column of a layer with input Hessian ``H`` float32 ``[in, in]``, the cost of a squared
    rounding error there once GPTQ (``config``: its dampening and act order) has folded it into the
    later columns, returned in the natural order. Inputs never seen (``H_ii == 0``) cost 0, as GPTQ
    zeroes their columns.

    GPTQ's ``1 / U_ii^2`` (``U`` the upper Cholesky factor of the damped ``H^-1`` in its column
    order) is the Schur complement of column ``i`` given the columns after it: the squared diagonal
    of the lower Cholesky factor of the damped ``H`` taken in reverse order. One factorization
    instead of GPTQ's three (factor, invert, factor again), the same values. While the damped ``H``
    is not positive definite, ``damp`` grows tenfold as in GPTQ (without its warning: the proxy only
    ranks), at most ``config.max_damp_retries`` times; then ``ValueError``.
    """
    diag = torch.diagonal(H)
    order = diag.masked_fill(diag == 0, 1.0)  # GPTQ's own: an unseen input's diagonal counts as 1
    perm = (torch.argsort(order, descending=True, stable=True) if config.act_order
            else torch.arange(H.shape[0], device=H.device))
    backwards = perm.flip(0)
    damp = config.damp
    for _ in range(config.max_damp_retries + 1):
        Hr = H[backwards][:, backwards].float()
        Hr.diagonal().copy_(order[backwards]).add_(damp * order.mean())
        L, info = torch.linalg.cholesky_ex(Hr)
        if info.item() == 0:
            weights = torch.empty_like(order).scatter_(0, backwards, L.diagonal().pow(2))
            return weights.masked_fill(diag == 0, 0.0)
        damp *= 10
    raise ValueError(f"the sensitivity proxy's Hessian stays singular after {config.max_damp_retries} dampening "
                     "retries; its calibration inputs are degenerate")


class _PassDone(Exception):
    """Raised by ``input_hessians``'s hook on the last linear of a pass to end that forward early."""


def input_hessians(model: nn.Module, windows: Tensor, names: Sequence[str], *,
                   memory_bytes: int = HESSIAN_MEMORY_BYTES) -> Iterator[tuple[list[str], Tensor]]:
    """The full input Hessian ``H = 2 X^T X / n`` (float32 ``[in, in]``) of every linear in ``names``
    over the forward passes of ``windows`` (int64 ``[n, seqlen]``), yielded as ``(linears, H)`` per
    distinct input: linears that read the same activations (q/k/v, gate/up) share one ``H``. Tensors
    are taken in passes of as many as ``memory_bytes`` of Hessians hold, each pass a forward of every
    window that stops at the pass's last linear, so the memory stays bounded whatever the model's
    size. Yielded in model order; a linear the forward never reaches gets nothing."""
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    modules = {n: model.get_submodule(n) for n in sorted(names, key=order.__getitem__)}
    passes: list[list[str]] = [[]]
    held = 0
    for n in modules:
        size = 4 * linear_weight(modules[n]).shape[1] ** 2  # float32 [in, in]
        if passes[-1] and held + size > memory_bytes:
            passes.append([])
            held = 0
        passes[-1].append(n)
        held += size
    was_training = model.training
    model.eval()
    try:
        for group in passes:
            sums: dict[str, Tensor] = {}  # by the first linear that reads each input
            first_reader: dict[str, str] = {}
            last: list = [None, None]  # the input seen last, and its first reader in this forward

            def hook(name: str):
                def before(module: nn.Module, args: Any) -> None:
                    x = args[0]
                    if x is not last[0]:
                        last[0], last[1] = x, name
                    first_reader[name] = last[1]
                    if last[1] == name:
                        flat = x.detach().float().reshape(-1, x.shape[-1])
                        sums[name] = flat.T @ flat if name not in sums else sums[name].addmm_(flat.T, flat)
                    if name == group[-1]:
                        raise _PassDone  # nothing after this linear is needed: the LM head is not run
                return before

            handles = [modules[n].register_forward_pre_hook(hook(n)) for n in group]
            try:
                with torch.no_grad():
                    for window in windows:
                        try:
                            model(input_ids=window[None], use_cache=False)
                        except _PassDone:
                            pass
                        last[0] = None
            finally:
                for h in handles:
                    h.remove()
            tokens = windows.numel()
            for key in [n for n in group if first_reader.get(n) == n]:  # a linear never run gets none
                yield [n for n in group if first_reader.get(n) == key], sums.pop(key).mul_(2 / tokens)
    finally:
        model.train(was_training)


def score_tensor(name: str, weight: Tensor, stats: LossStatistics, candidates: Sequence[Candidate]
                 ) -> TensorSensitivity:
    """``TensorSensitivity`` of one weight ``[out, in]`` from its ``LossStatistics`` (the input
    moments are also the GGUF search's importance)."""
    weight = weight.detach().float()
    shape = (int(weight.shape[0]), int(weight.shape[1]))
    result = TensorSensitivity(name, shape)
    norm = float(weight.norm())
    error_weights = stats.error_weights.float()
    for c in candidates:
        why = c.fit(shape)
        if why is not None:
            result.skipped[c.name] = why
            continue
        delta = c.round_trip(weight, stats.input_sq) - weight
        if norm > 0 and float(delta.norm()) < SOURCE_GRID_RTOL * norm:
            result.skipped[c.name] = (f"re-hits the weights' source grid (relative error "
                                      f"{float(delta.norm()) / norm:.1e}): it would look lossless for the wrong reason")
            continue
        per_output = output_errors(delta, error_weights)
        error = (per_output * stats.fisher.double()).sum()
        result.options.append(Option(c, c.stored_bits(shape), float(error), float(per_output.sum())))
    result.options.sort(key=lambda o: (o.bits, o.error))
    return result


def measure_sensitivity(model: nn.Module, calibration: Tensor, candidates_for: Callable[[str], Sequence[Candidate]],
                        names: Sequence[str], *, windows: int = PROXY_WINDOWS, method: str = "rtn",
                        method_config: Any = None, gptq_windows: int = GPTQ_PROXY_WINDOWS,
                        progress: bool = True) -> dict[str, TensorSensitivity]:
    """Score every linear in ``names`` (full module names) against ``candidates_for(name)``, from one
    forward and backward pass over the first ``windows`` windows of ``calibration`` (int64
    ``[samples, seqlen]``); with ``method`` ``"gptq"`` (``method_config`` a ``GPTQConfig`` or None
    for its defaults) the errors of the block linears are weighed as GPTQ leaves them
    (``gptq_column_weights``), from Hessians of the first ``gptq_windows`` windows. The model is not
    modified.

    Raises:
        ValueError: a name that is no module of the model, or no calibration windows.
    """
    from tqdm import tqdm

    available = dict(model.named_modules())
    missing = [n for n in names if n not in available]
    if missing:
        raise ValueError(f"no linear called {missing[0]!r} in the model")
    if not isinstance(calibration, Tensor) or calibration.dim() != 2 or calibration.shape[0] == 0 or windows < 1:
        raise ValueError("the sensitivity proxy needs calibration token windows [samples, seqlen] and windows >= 1")
    stats = loss_statistics(model, calibration[:windows], list(names))
    if method == "gptq":  # the linears outside the blocks (an LM head) get RTN: no statistics there
        config = method_config if isinstance(method_config, GPTQConfig) else GPTQConfig()
        inside = [n for n in names if n.startswith(architecture_for(model).blocks + ".")]
        for readers, H in tqdm(input_hessians(model, calibration[:gptq_windows], inside),
                               desc="GPTQ proxy", unit="input", disable=not progress):
            weights = gptq_column_weights(H, config)
            for n in readers:
                stats[n].column_weights = weights
    return {n: score_tensor(n, linear_weight(available[n]), stats[n], candidates_for(n))
            for n in tqdm(names, desc="sensitivity", unit="tensor", disable=not progress)}

"""Sensitivity: the output error each candidate would cause in each tensor, from calibration statistics.

The proxy is GPTQ's objective weighted by how much the loss cares about each output:
``E = sum_j F_j (dW H dW^T)_jj`` with ``H = 2 X^T X / n`` the Hessian of the layer's inputs over the
calibration tokens, ``dW`` the candidate's round-trip error (RTN for a lowbit scheme, the
importance-weighted block search for a GGUF type) and ``F_j`` the mean squared gradient of the
language-model loss with respect to output ``j`` of the layer (the diagonal empirical Fisher of the
outputs, from one backward pass over a few calibration windows): a second-order estimate of the loss
increase. Unweighted, ``tr(dW H dW^T)`` cannot compare layers: an early layer's outputs are small
beside the residual stream they join, so its errors look cheap while they travel through every later
block (on SmolLM2 it gave block 0 two bits). One forward pass collects every Hessian, block by block
(``pipeline.statistics.stream_input_statistics``), and each block's candidates are scored while its
Hessians are alive, so memory stays one block's worth.

A candidate whose round trip leaves a tensor (nearly) unchanged re-hits the grid the float weights
came from (the demo models are dequantized GGUF files): it is excluded for every tensor, since it
would look lossless for the wrong reason.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lowbit.auto.candidates import Candidate
from lowbit.pipeline.sequential import linear_weight
from lowbit.pipeline.statistics import InputMoments, stream_input_statistics

# Relative Frobenius error below which a round trip counts as re-hitting the source grid; 8-bit
# round trips of the demo models are ~5e-3, float16 rounding of a re-hit grid ~1e-4.
SOURCE_GRID_RTOL = 1e-3
FISHER_WINDOWS = 8  # windows of the backward pass: the Fisher is a per-output average, stable on few


@dataclass
class Option:
    """One candidate for one tensor: its exact stored bits, its proxy error (Fisher-weighted) and the
    unweighted ``tr(dW H dW^T)`` beside it (reported, not optimised)."""

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


def output_errors(delta: Tensor, H: Tensor) -> Tensor:
    """``diag(dW H dW^T)``: per output of ``delta`` ``[out, in]`` its error under ``H`` ``[in, in]``, float64."""
    return ((delta @ H) * delta).sum(1, dtype=torch.float64)


def output_fisher(model: nn.Module, windows: Tensor, names: Sequence[str]) -> dict[str, Tensor]:
    """Per linear in ``names``, the mean over tokens of the squared gradient of the next-token loss
    with respect to each of its outputs, float32 ``[out_features]``, over ``windows`` (one at a time).

    Gradients flow to activations only: the parameters get none (no float copy of their gradients).
    """
    sums: dict[str, Tensor] = {}
    tokens = 0
    handles = []

    def watch(name: str):
        def hook(module: nn.Module, args: Any, out: Tensor) -> None:
            if out.requires_grad:
                def accumulate(g: Tensor) -> None:
                    sq = g.detach().float().pow(2).reshape(-1, g.shape[-1]).sum(0)
                    sums[name] = sq if name not in sums else sums[name] + sq
                out.register_hook(accumulate)
        return hook

    def leaf(module: nn.Module, args: Any, out: Tensor) -> Tensor:
        return out.detach().requires_grad_(True)

    handles.append(model.get_input_embeddings().register_forward_hook(leaf))
    handles += [model.get_submodule(n).register_forward_hook(watch(n)) for n in names]
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            for window in windows:
                ids = window[None]
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                loss.backward()
                tokens += ids.numel()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {n: sums[n] / tokens for n in names}


def score_tensor(name: str, weight: Tensor, H: Tensor, importance: Tensor | None,
                 candidates: Sequence[Candidate], fisher: Tensor | None = None) -> TensorSensitivity:
    """``TensorSensitivity`` of one weight ``[out, in]`` given its input Hessian ``H``, imatrix and
    output Fisher ``fisher`` ``[out]`` (None: every output weighs 1, plain ``tr(dW H dW^T)``)."""
    weight = weight.detach().float()
    shape = (int(weight.shape[0]), int(weight.shape[1]))
    result = TensorSensitivity(name, shape)
    norm = float(weight.norm())
    H = H.float()
    for c in candidates:
        why = c.fit(shape)
        if why is not None:
            result.skipped[c.name] = why
            continue
        delta = c.round_trip(weight, importance) - weight
        if norm > 0 and float(delta.norm()) < SOURCE_GRID_RTOL * norm:
            result.skipped[c.name] = (f"re-hits the weights' source grid (relative error "
                                      f"{float(delta.norm()) / norm:.1e}): it would look lossless for the wrong reason")
            continue
        per_output = output_errors(delta, H)
        weighted = per_output.sum() if fisher is None else (per_output * fisher.double()).sum()
        result.options.append(Option(c, c.stored_bits(shape), float(weighted), float(per_output.sum())))
    result.options.sort(key=lambda o: (o.bits, o.error))
    return result


def measure_sensitivity(model: nn.Module, calibration: Tensor, candidates_for: Callable[[str], Sequence[Candidate]],
                        names: Sequence[str], *, batch_size: int = 4, fisher_windows: int = FISHER_WINDOWS,
                        progress: bool = True) -> dict[str, TensorSensitivity]:
    """Score every linear in ``names`` (full module names) against ``candidates_for(name)``.

    One forward pass over ``calibration`` (int64 ``[samples, seqlen]``) collects the Hessians, one
    forward and backward pass over its first ``fisher_windows`` windows the output Fishers (0: no
    weighting); the model is not modified. Raises ``ValueError`` as ``stream_input_statistics`` does.
    """
    wanted = set(names)
    modules = {id(m): n for n, m in model.named_modules() if n in wanted}
    missing = wanted - set(modules.values())
    if missing:
        raise ValueError(f"no linear called {sorted(missing)[0]!r} in the model")
    fisher = output_fisher(model, calibration[:fisher_windows], list(names)) if fisher_windows else {}
    result: dict[str, TensorSensitivity] = {}
    stream = stream_input_statistics(model, calibration, lambda m: id(m) in modules,
                                     new_record=lambda: InputMoments(hessian=True), batch_size=batch_size,
                                     progress=progress)
    for chunk in stream:
        for name, record in chunk.items():
            module = model.get_submodule(name)
            result[name] = score_tensor(name, linear_weight(module), record.H, record.sqmean, candidates_for(name),
                                        fisher.get(name))
        del chunk
    return {n: result[n] for n in names}

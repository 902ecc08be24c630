"""Perplexity, and KL divergence / top-1 agreement against a reference model, on token windows.

Each window is scored independently (see :mod:`lowbit.evaluate.text` for how windows are cut):

* without BOS the input is the window itself and its last ``L-1`` tokens are predicted;
* with BOS (models such as Gemma are ~2.5x worse without it) the input is ``[bos] + window``
  and all ``L`` window tokens are predicted.

``ppl = exp(total NLL / predicted tokens)``. With a ``reference`` model (same tokenizer), both
models run on the same input and, over the same predicted positions, we accumulate
``KL(reference || model) = sum_v p_ref (log p_ref - log p_model)`` of the full next-token
distributions and how often the two argmaxes agree.

Memory is the constraint that shapes the code: vocabularies are 49k-262k entries, so a single
512-token window of Gemma logits is already 512 MB in float32. We therefore never keep more than
one batch of logits, and the float32 log-softmax (upcast so low-precision models are scored
accurately) is done on chunks of positions whose size is bounded in bytes, not in tokens.
Sums are accumulated in float64 so the result does not depend on the chunking.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lowbit.device import resolve_device
from lowbit.nn import move_model

__all__ = ["EvalResult", "evaluate_models", "evaluate_windows"]

# Upper bound on the float32 elements of one chunk of log-probabilities (64 MiB). Several
# temporaries of this size are alive at once while computing KL, so the working set stays in
# the low hundreds of MB on top of the model's own logits, whatever the vocabulary.
_CHUNK_ELEMENTS = 1 << 24


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """Outcome of :func:`evaluate_windows`.

    ``nll`` is the mean negative log-likelihood per predicted token (nats) and ``tokens`` the
    number of predicted tokens (``windows * seqlen`` with BOS, ``windows * (seqlen - 1)``
    without). ``kld``/``top1`` are ``None`` when no reference model was given. ``seconds`` is the
    wall time of the scoring loop (both models when there is a reference).
    """

    ppl: float
    nll: float
    tokens: int
    windows: int
    seqlen: int
    bos: bool
    kld: float | None
    top1: float | None
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        """Predicted tokens scored per second of wall time (0 when no time was measured)."""
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict of all fields plus ``tokens_per_second``."""
        d = dataclasses.asdict(self)
        d["tokens_per_second"] = self.tokens_per_second
        return d


def _device_of(model: torch.nn.Module) -> torch.device:
    """Device of the model's first parameter (where its input ids must go)."""
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def _forward_logits(model: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits ``[batch, time, vocab]`` for every input position.

    Hugging Face models get ``use_cache=False``: a KV cache is useless for scoring and costs
    memory. Plain modules returning a tensor (or a tuple whose first item is the logits) work too.
    """
    kwargs = {"use_cache": False} if hasattr(model, "config") else {}
    out = model(input_ids=input_ids, **kwargs) if kwargs else model(input_ids)
    logits = getattr(out, "logits", out)
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or logits.shape[:2] != input_ids.shape:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(
            f"model must return logits [batch, time, vocab] for every input position; "
            f"got {shape} for input {tuple(input_ids.shape)}"
        )
    return logits


def _model_inputs(windows: torch.Tensor, bos_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, target ids) for a batch of windows, following the BOS rule.

    Logit position ``t`` predicts input token ``t+1``; we return the targets so that the first
    ``targets.shape[1]`` logit positions are the scored ones.
    """
    if bos_id is None:
        return windows, windows[:, 1:]
    bos = torch.full((windows.shape[0], 1), int(bos_id), dtype=windows.dtype, device=windows.device)
    return torch.cat([bos, windows], dim=1), windows


def evaluate_windows(
    model: torch.nn.Module,
    windows: torch.Tensor,
    *,
    bos_id: int | None,
    reference: torch.nn.Module | None = None,
    batch_size: int = 1,
    progress: bool = True,
    device: torch.device | str | None = None,
) -> EvalResult:
    """Score ``windows`` (``[n, L]`` token ids) with ``model``; optionally compare to ``reference``.

    ``bos_id`` is the BOS token to prepend, or ``None`` for models that do not need one.
    ``reference`` must share the tokenizer (same vocabulary size); it may live on another device.
    ``batch_size`` windows are run per forward pass; it changes speed and memory, not the
    definition of the result (only float rounding). The computation has no randomness and runs
    under ``torch.inference_mode`` with the models in eval mode (restored afterwards).

    ``device`` ("cpu", "cuda", "cuda:N", "auto"; ``lowbit.device``): where the models run. None runs
    each where its parameters are; a device moves the models there first, in place, and leaves them
    there (``lowbit.nn.move_model``: quantized layers get the kernel that device has). The scores are
    summed in float64 on the scored model's device.
    """
    return evaluate_models([model], windows, bos_id=bos_id, reference=reference, batch_size=batch_size,
                           progress=progress, device=device)[0]


def evaluate_models(
    models: Sequence[torch.nn.Module],
    windows: torch.Tensor,
    *,
    bos_id: int | None,
    reference: torch.nn.Module | None = None,
    batch_size: int = 1,
    progress: bool = True,
    device: torch.device | str | None = None,
) -> list[EvalResult]:
    """``evaluate_windows`` for several models against one reference, whose forward pass then runs
    once per window instead of once per model (a benchmark table costs half as much). Only the
    reference's logits and one model's logits are alive at a time. ``seconds`` of each result
    counts that model's forward passes and scoring, plus the shared reference passes. ``device``:
    as ``evaluate_windows``' (every model and the reference go there)."""
    n_windows, seqlen = _check_windows(windows, bos_id, batch_size)
    all_models = [*models, *([reference] if reference is not None else [])]
    if device is not None:
        target = resolve_device(device)
        for m in all_models:
            if isinstance(m, torch.nn.Module) and _device_of(m) != target:
                move_model(m, target)
    was_training = [bool(getattr(m, "training", False)) for m in all_models]
    for m in all_models:
        if hasattr(m, "eval"):
            m.eval()
    scores = [_Score(_device_of(m), reference is not None) for m in models]
    windows = windows.long()
    bar = tqdm(total=n_windows * len(models), desc="perplexity", unit="win", file=sys.stderr, disable=not progress)
    ref_seconds = 0.0
    try:
        with torch.inference_mode():
            for b0 in range(0, n_windows, batch_size):
                batch = windows[b0 : b0 + batch_size]
                ref_logits = None
                if reference is not None:
                    start = time.perf_counter()
                    ref_logits = _forward_logits(reference, _model_inputs(batch, bos_id)[0].to(_device_of(reference)))
                    ref_seconds += time.perf_counter() - start
                for model, score in zip(models, scores):
                    start = time.perf_counter()
                    inputs, targets = _model_inputs(batch.to(score.device), bos_id)
                    score.add(_forward_logits(model, inputs), targets, ref_logits)
                    score.seconds += time.perf_counter() - start
                    bar.update(batch.shape[0])
                    if progress and len(models) == 1:
                        bar.set_postfix(ppl=f"{_safe_exp(score.nll_sum.item() / score.tokens):.4g}", refresh=False)
                del ref_logits
    finally:
        bar.close()
        for m, training in zip(all_models, was_training):
            if training and hasattr(m, "train"):
                m.train()
    return [score.result(n_windows, seqlen, bos_id is not None, ref_seconds) for score in scores]


def _check_windows(windows: torch.Tensor, bos_id: int | None, batch_size: int) -> tuple[int, int]:
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2:
        raise ValueError("windows must be a 2-D tensor of token ids [n_windows, seqlen]")
    if windows.dtype.is_floating_point or windows.dtype.is_complex or windows.dtype == torch.bool:
        raise ValueError(f"windows must hold integer token ids, got {windows.dtype}")
    n_windows, seqlen = windows.shape
    if n_windows < 1:
        raise ValueError("no windows to evaluate")
    if (seqlen if bos_id is not None else seqlen - 1) < 1:
        raise ValueError(f"a window of {seqlen} token(s) without BOS predicts nothing; use seqlen >= 2")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    return n_windows, seqlen


class _Score:
    """Running sums for one model: NLL, KL to the reference and top-1 agreements (float64/int64)."""

    def __init__(self, device: torch.device, with_reference: bool) -> None:
        self.device = device
        self.with_reference = with_reference
        self.nll_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.kl_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.agree = torch.zeros((), dtype=torch.int64, device=device)
        self.tokens = 0
        self.seconds = 0.0

    def add(self, logits: torch.Tensor, targets: torch.Tensor, ref_logits: torch.Tensor | None) -> None:
        """Accumulate one batch; logits positions ``[:, :n_pred]`` predict ``targets``."""
        if ref_logits is not None and ref_logits.shape[-1] != logits.shape[-1]:
            raise ValueError(
                f"reference vocabulary ({ref_logits.shape[-1]}) differs from the model's "
                f"({logits.shape[-1]}); KL needs the same tokenizer"
            )
        n_pred = targets.shape[1]
        chunk = max(1, _CHUNK_ELEMENTS // logits.shape[-1])
        for row in range(targets.shape[0]):
            for t0 in range(0, n_pred, chunk):
                t1 = min(t0 + chunk, n_pred)
                lp = F.log_softmax(logits[row, t0:t1].float(), dim=-1)
                self.nll_sum -= lp.gather(-1, targets[row, t0:t1].unsqueeze(-1)).squeeze(-1).double().sum()
                if ref_logits is not None:
                    ref_lp = F.log_softmax(ref_logits[row, t0:t1].to(self.device).float(), dim=-1)
                    p_ref = ref_lp.exp()
                    # p_ref == 0 terms contribute 0 (avoid 0 * inf = nan on masked vocab).
                    kl = torch.where(p_ref > 0, p_ref * (ref_lp - lp), torch.zeros((), device=self.device))
                    self.kl_sum += kl.sum(dim=-1).double().sum()
                    self.agree += (ref_lp.argmax(dim=-1) == lp.argmax(dim=-1)).sum()
        self.tokens += targets.shape[0] * n_pred

    def result(self, windows: int, seqlen: int, bos: bool, ref_seconds: float) -> EvalResult:
        nll = self.nll_sum.item() / self.tokens
        return EvalResult(
            ppl=_safe_exp(nll),
            nll=nll,
            tokens=self.tokens,
            windows=windows,
            seqlen=seqlen,
            bos=bos,
            kld=self.kl_sum.item() / self.tokens if self.with_reference else None,
            top1=self.agree.item() / self.tokens if self.with_reference else None,
            seconds=self.seconds + ref_seconds,
        )


def _safe_exp(x: float) -> float:
    """``exp`` that returns ``inf`` instead of raising for a hopeless model."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf

"""Distillation losses and the teacher's cached top-k logits.

The teacher is the float model, the loss KL(teacher || student) on next-token distributions. On a
CPU the teacher's forward costs as much as the student's, so its top ``k`` log-probabilities per
position are computed once and stored (safetensors, keyed by the token ids they were computed on).
The loss is the exact KL between the two distributions coarsened to ``k + 1`` outcomes, the
teacher's top ``k`` tokens and "any other token":

    sum_k p_k (log p_k - log q_k) + p_rest (log p_rest - log q_rest),  p_rest = 1 - sum_k p_k

It is zero exactly when the student matches the teacher on those tokens and on the tail's total
mass, never negative, and never above the full KL (coarsening loses information). Renormalising
``p`` over the top ``k`` and dropping the tail, as sparse-logit distillation often does, is not a
divergence: its minimum puts all of the student's mass on the ``k`` tokens (overconfidence), and
the teacher itself scores ``-log(top-k mass)`` (0.19 on SmolLM2 with ``k`` = 64) instead of 0.
With ``k`` the vocabulary size the loss is the exact KL.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn


CACHE_FORMAT = "topk-logprobs-2"  # log-softmax over the whole vocabulary, not renormalised over the k
_TINY = 1e-12  # floor of a probability before its log


@dataclass
class TeacherTopK:
    """The teacher's top-``k`` log-probabilities ``[n, L, k]`` (log-softmax over the whole
    vocabulary) and their token ids (int32, same shape) for windows ``ids [n, L]``."""

    ids: Tensor
    logprobs: Tensor
    index: Tensor


def kl_full(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """Mean over positions of KL(softmax(teacher) || softmax(student)), logits ``[..., V]``."""
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    s = F.log_softmax(student_logits.float(), dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean()


def kl_topk(teacher_logprobs: Tensor, teacher_index: Tensor, student_logits: Tensor) -> Tensor:
    """Mean over positions of the KL between teacher and student coarsened to the teacher's top ``k``
    tokens plus the rest (see the module docstring); ``teacher_logprobs`` are full log-softmax values."""
    s = F.log_softmax(student_logits.float(), dim=-1).gather(-1, teacher_index.long())
    p = teacher_logprobs.exp()
    top = (p * (teacher_logprobs - s)).sum(-1)
    p_rest = (1 - p.sum(-1)).clamp_min(0)
    q_rest = (1 - s.exp().sum(-1)).clamp_min(_TINY)
    rest = torch.where(p_rest > 0, p_rest * (torch.log(p_rest.clamp_min(_TINY)) - torch.log(q_rest)), 0.0)
    return (top + rest).mean()


@torch.no_grad()
def teacher_topk(teacher: nn.Module, ids: Tensor, k: int) -> TeacherTopK:
    """Run ``teacher`` over every window of ``ids [n, L]`` once and keep its top ``k`` per position."""
    values, indices = [], []
    for window in ids:
        logits = teacher(input_ids=window[None], use_cache=False).logits[0].float()
        top = F.log_softmax(logits, dim=-1).topk(k, dim=-1)
        values.append(top.values)
        indices.append(top.indices.to(torch.int32))
    return TeacherTopK(ids, torch.stack(values), torch.stack(indices))


def cached_teacher_topk(teacher: nn.Module, ids: Tensor, k: int, path: Path) -> TeacherTopK:
    """``teacher_topk``, read from ``path`` when it holds the same windows and ``k`` in this cache format
    (an older file is recomputed), else computed and written there (through a temporary name, so an interrupted write leaves no half file)."""
    if path.is_file():
        try:
            with safe_open(str(path), "pt") as f:
                current = (f.metadata() or {}).get("format") == CACHE_FORMAT
                saved = {k: f.get_tensor(k) for k in f.keys()} if current else {}
        except (SafetensorError, OSError):
            saved = {}
        if ("ids" in saved and torch.equal(saved["ids"], ids) and saved["logprobs"].shape[-1] == k):
            return TeacherTopK(saved["ids"], saved["logprobs"], saved["index"])
    cache = teacher_topk(teacher, ids, k)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    save_file({"ids": ids.contiguous(), "logprobs": cache.logprobs.contiguous(), "index": cache.index.contiguous()},
              str(tmp), metadata={"format": CACHE_FORMAT})
    os.replace(tmp, path)
    return cache


def check_same_vocabulary(teacher: nn.Module, student: nn.Module) -> None:
    """Refuse a teacher whose output vocabulary differs from the student's, in one line."""
    t = teacher.get_output_embeddings().out_features
    s = student.get_output_embeddings().out_features
    if t != s:
        raise ValueError(f"the teacher predicts {t} tokens, the student {s}: distillation needs the same vocabulary; "
                         "pass the float model the student was quantized from as --teacher")

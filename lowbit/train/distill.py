"""Distillation losses and the teacher's cached top-k logits.

The teacher is the float model, the loss KL(teacher || student) on next-token distributions. On a
CPU the teacher's forward costs as much as the student's, so its top ``k`` log-probabilities per
position are computed once and stored (safetensors, keyed by the token ids they were computed on);
the loss then reads them: ``sum_k p_k (log p_k - log q_k)`` over the teacher's top ``k`` tokens,
``p`` renormalised over them and ``log q`` the student's full log-softmax. With ``k`` the vocabulary
size this is the exact KL; 64 of SmolLM2's 49k tokens hold most of the teacher's mass.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn


@dataclass
class TeacherTopK:
    """The teacher's top-``k`` log-probabilities ``[n, L, k]`` (renormalised over the ``k``) and
    their token ids (int32, same shape) for windows ``ids [n, L]``."""

    ids: Tensor
    logprobs: Tensor
    index: Tensor


def kl_full(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """Mean over positions of KL(softmax(teacher) || softmax(student)), logits ``[..., V]``."""
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    s = F.log_softmax(student_logits.float(), dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean()


def kl_topk(teacher_logprobs: Tensor, teacher_index: Tensor, student_logits: Tensor) -> Tensor:
    """Mean over positions of ``sum_k p_k (log p_k - log q_k)`` over the teacher's top ``k`` tokens."""
    s = F.log_softmax(student_logits.float(), dim=-1).gather(-1, teacher_index.long())
    return (teacher_logprobs.exp() * (teacher_logprobs - s)).sum(-1).mean()


@torch.no_grad()
def teacher_topk(teacher: nn.Module, ids: Tensor, k: int) -> TeacherTopK:
    """Run ``teacher`` over every window of ``ids [n, L]`` once and keep its top ``k`` per position."""
    values, indices = [], []
    for window in ids:
        logits = teacher(input_ids=window[None], use_cache=False).logits[0].float()
        top = logits.topk(k, dim=-1)
        values.append(F.log_softmax(top.values, dim=-1))
        indices.append(top.indices.to(torch.int32))
    return TeacherTopK(ids, torch.stack(values), torch.stack(indices))


def cached_teacher_topk(teacher: nn.Module, ids: Tensor, k: int, path: Path) -> TeacherTopK:
    """``teacher_topk``, read from ``path`` when it holds the same windows and ``k``, else computed and
    written there (through a temporary name, so an interrupted write leaves no half file)."""
    if path.is_file():
        try:
            saved = load_file(path)
        except (SafetensorError, OSError):
            saved = {}
        if ("ids" in saved and torch.equal(saved["ids"], ids) and saved["logprobs"].shape[-1] == k):
            return TeacherTopK(saved["ids"], saved["logprobs"], saved["index"])
    cache = teacher_topk(teacher, ids, k)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    save_file({"ids": ids.contiguous(), "logprobs": cache.logprobs.contiguous(), "index": cache.index.contiguous()},
              str(tmp))
    os.replace(tmp, path)
    return cache


def check_same_vocabulary(teacher: nn.Module, student: nn.Module) -> None:
    """Refuse a teacher whose output vocabulary differs from the student's, in one line."""
    t = teacher.get_output_embeddings().out_features
    s = student.get_output_embeddings().out_features
    if t != s:
        raise ValueError(f"the teacher predicts {t} tokens, the student {s}: distillation needs the same vocabulary; "
                         "pass the float model the student was quantized from as --teacher")

"""The distillation loss is a divergence: zero for the teacher itself, never negative, at most the full
KL, the full KL when k is the vocabulary; the cache is reused only in its own format."""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from lowbit.train.distill import cached_teacher_topk, kl_full, kl_topk


def _logits(seed: int, shape=(3, 16, 200)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 3


def _top(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    top = torch.log_softmax(logits, -1).topk(k, dim=-1)
    return top.values, top.indices.to(torch.int32)


def test_topk_kl_is_zero_for_the_teacher_and_bounded_by_the_full_kl():
    teacher, student = _logits(0), _logits(1)
    lp, idx = _top(teacher, 8)
    assert abs(kl_topk(lp, idx, teacher).item()) < 1e-6
    coarse = kl_topk(lp, idx, student).item()
    assert 0 < coarse <= kl_full(teacher, student).item()
    sharper = teacher.clone()  # all of the mass on the top 8: the renormalised loss would prefer it
    sharper.scatter_(-1, idx.long(), sharper.gather(-1, idx.long()) + 5)
    assert kl_topk(lp, idx, sharper).item() > 0.1


def test_topk_kl_with_the_whole_vocabulary_is_the_kl():
    teacher, student = _logits(2), _logits(3)
    lp, idx = _top(teacher, 200)
    assert torch.allclose(kl_topk(lp, idx, student), kl_full(teacher, student), atol=1e-5)


class _Teacher(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(50, 50)
        self.calls = 0

    def forward(self, input_ids, use_cache=False):
        self.calls += 1
        return type("Out", (), {"logits": self.emb(input_ids)})()


def test_the_cache_is_reused_in_its_format_and_recomputed_otherwise(tmp_path):
    teacher = _Teacher()
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    path = tmp_path / "teacher.safetensors"
    first = cached_teacher_topk(teacher, ids, 4, path)
    assert teacher.calls == 2
    again = cached_teacher_topk(teacher, ids, 4, path)
    assert teacher.calls == 2 and torch.equal(again.logprobs, first.logprobs)
    save_file({"ids": ids, "logprobs": first.logprobs, "index": first.index}, str(path))  # no format: older file
    cached_teacher_topk(teacher, ids, 4, path)
    assert teacher.calls == 4

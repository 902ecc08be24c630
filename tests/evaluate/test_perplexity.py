"""Perplexity / KL / top-1 of evaluate_windows against direct computations, on a tiny random Llama.

Also covers the small speed and memory helpers in lowbit.evaluate.speed.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from lowbit.evaluate import perplexity as ppl_mod
from lowbit.evaluate.perplexity import EvalResult, evaluate_windows
from lowbit.evaluate.speed import forward_throughput, measure_load, peak_rss_bytes, process_rss_bytes
from lowbit.evaluate.text import token_windows

transformers = pytest.importorskip("transformers")

VOCAB = 512
BOS = 1


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        bos_token_id=BOS,
    )
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    return other


@pytest.fixture(scope="module")
def windows() -> torch.Tensor:
    gen = torch.Generator().manual_seed(2)
    return torch.randint(2, VOCAB, (3, 16), generator=gen)


def _inputs(windows: torch.Tensor, bos: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) built independently of lowbit's helper."""
    if bos:
        inputs = torch.cat([torch.full((windows.shape[0], 1), BOS), windows], dim=1)
        return inputs, windows
    return windows, windows[:, 1:]


def _direct_logprobs(model: torch.nn.Module, windows: torch.Tensor, bos: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Full log-probs [n, predicted, V] of the scored positions and their targets."""
    inputs, targets = _inputs(windows, bos)
    with torch.no_grad():
        logits = model(inputs).logits.float()
    return F.log_softmax(logits[:, : targets.shape[1]], dim=-1), targets


@pytest.mark.parametrize("bos", [False, True])
def test_ppl_matches_cross_entropy(model, windows, bos: bool) -> None:
    n, L = windows.shape
    res = evaluate_windows(model, windows, bos_id=BOS if bos else None, progress=False)
    inputs, targets = _inputs(windows, bos)
    with torch.no_grad():
        logits = model(inputs).logits.float()[:, : targets.shape[1]]
    total = F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1), reduction="sum").item()
    assert res.tokens == (n * L if bos else n * (L - 1))
    assert res.windows == n and res.seqlen == L and res.bos is bos
    assert res.nll == pytest.approx(total / res.tokens, rel=1e-5)
    assert res.ppl == pytest.approx(math.exp(total / res.tokens), rel=1e-5)
    assert res.kld is None and res.top1 is None
    assert res.seconds > 0


def test_bos_changes_the_scored_tokens(model, windows) -> None:
    a = evaluate_windows(model, windows, bos_id=None, progress=False)
    b = evaluate_windows(model, windows, bos_id=BOS, progress=False)
    assert b.tokens - a.tokens == windows.shape[0]
    assert a.ppl != b.ppl


def test_batching_and_chunking_do_not_change_result(model, perturbed, windows, monkeypatch) -> None:
    base = evaluate_windows(model, windows, bos_id=BOS, reference=perturbed, progress=False)
    batched = evaluate_windows(model, windows, bos_id=BOS, reference=perturbed, batch_size=2, progress=False)
    monkeypatch.setattr(ppl_mod, "_CHUNK_ELEMENTS", 3 * VOCAB)  # 3 positions per chunk
    chunked = evaluate_windows(model, windows, bos_id=BOS, reference=perturbed, progress=False)
    for other in (batched, chunked):
        assert other.tokens == base.tokens
        assert other.ppl == pytest.approx(base.ppl, rel=1e-5)
        assert other.kld == pytest.approx(base.kld, rel=1e-4)
        assert other.top1 == base.top1


def test_deterministic(model, windows) -> None:
    a = evaluate_windows(model, windows, bos_id=None, progress=False)
    b = evaluate_windows(model, windows, bos_id=None, progress=False)
    assert a.nll == b.nll


def test_kl_against_itself_is_zero(model, windows) -> None:
    res = evaluate_windows(model, windows, bos_id=None, reference=model, progress=False)
    assert res.kld == pytest.approx(0.0, abs=1e-7)
    assert res.top1 == 1.0


@pytest.mark.parametrize("bos", [False, True])
def test_kl_against_perturbed_copy_matches_direct(model, perturbed, windows, bos: bool) -> None:
    res = evaluate_windows(model, windows, bos_id=BOS if bos else None, reference=perturbed, progress=False)
    lp, _ = _direct_logprobs(model, windows, bos)
    ref_lp, _ = _direct_logprobs(perturbed, windows, bos)
    kl_direct = (ref_lp.exp() * (ref_lp - lp)).sum(-1).double().mean().item()
    top1_direct = (ref_lp.argmax(-1) == lp.argmax(-1)).double().mean().item()
    assert res.kld > 0
    assert res.kld == pytest.approx(kl_direct, rel=1e-4)
    # Same thing with torch's own kl_div, KL(ref || model) = kl_div(input=log q, target=log p).
    kl_torch = F.kl_div(lp, ref_lp, log_target=True, reduction="sum").item() / res.tokens
    assert res.kld == pytest.approx(kl_torch, rel=1e-4)
    assert res.top1 == pytest.approx(top1_direct)
    assert 0.0 <= res.top1 <= 1.0


def test_kl_direction_is_reference_to_model(model, perturbed, windows) -> None:
    forward = evaluate_windows(model, windows, bos_id=None, reference=perturbed, progress=False)
    backward = evaluate_windows(perturbed, windows, bos_id=None, reference=model, progress=False)
    lp, _ = _direct_logprobs(model, windows, False)
    ref_lp, _ = _direct_logprobs(perturbed, windows, False)
    assert backward.kld == pytest.approx((lp.exp() * (lp - ref_lp)).sum(-1).mean().item(), rel=1e-4)
    assert forward.kld != pytest.approx(backward.kld, rel=1e-6)


def test_end_to_end_with_tokenizer(model) -> None:
    class Tok:
        def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
            return [ord(c) % (VOCAB - 2) + 2 for c in text]

    w = token_windows("Some evaluation text, repeated. " * 10, Tok(), seqlen=32, max_windows=4)
    res = evaluate_windows(model, w, bos_id=None, progress=False)
    assert res.windows == 4 and res.tokens == 4 * 31
    assert 1.0 < res.ppl < 10 * VOCAB


def test_result_is_frozen_and_serialisable(model, windows) -> None:
    res = evaluate_windows(model, windows, bos_id=None, progress=False)
    assert isinstance(res, EvalResult)
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.ppl = 1.0  # type: ignore[misc]
    d = res.to_dict()
    assert {"ppl", "nll", "tokens", "windows", "seqlen", "bos", "kld", "top1", "seconds", "tokens_per_second"} <= set(d)
    assert d["tokens_per_second"] == pytest.approx(res.tokens / res.seconds)


def test_progress_bar_goes_to_stderr(model, windows, capsys) -> None:
    evaluate_windows(model, windows[:1], bos_id=None, progress=True)
    out, err = capsys.readouterr()
    assert out == ""
    assert "perplexity" in err


def test_training_mode_is_restored(model, windows) -> None:
    model.train()
    try:
        evaluate_windows(model, windows[:1], bos_id=None, progress=False)
        assert model.training
    finally:
        model.eval()


def test_input_errors(model, windows) -> None:
    with pytest.raises(ValueError, match="2-D"):
        evaluate_windows(model, windows[0], bos_id=None, progress=False)
    with pytest.raises(ValueError, match="predicts nothing"):
        evaluate_windows(model, windows[:, :1], bos_id=None, progress=False)
    with pytest.raises(ValueError, match="integer"):
        evaluate_windows(model, windows.float(), bos_id=None, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        evaluate_windows(model, windows, bos_id=None, batch_size=0, progress=False)
    # A one-token window is still scorable with BOS.
    assert evaluate_windows(model, windows[:, :1], bos_id=BOS, progress=False).tokens == windows.shape[0]


def test_reference_with_other_vocab_is_an_error(model, windows) -> None:
    class Other(torch.nn.Module):
        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return torch.zeros(*input_ids.shape, VOCAB + 1)

    with pytest.raises(ValueError, match="vocabulary"):
        evaluate_windows(model, windows, bos_id=None, reference=Other(), progress=False)


def test_kl_ignores_vocab_entries_the_reference_rules_out(windows) -> None:
    """-inf logits (masked vocabulary) give p_ref = 0 terms, which must add 0, not nan."""

    class Fixed(torch.nn.Module):
        def __init__(self, shift: float) -> None:
            super().__init__()
            gen = torch.Generator().manual_seed(3)
            self.table = torch.randn(VOCAB, VOCAB, generator=gen) + shift
            self.table[:, :10] = float("-inf")

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.table[input_ids]

    ref, mod = Fixed(0.0), Fixed(0.0)
    mod.table[:, 10:] += 0.1 * torch.randn(VOCAB, VOCAB - 10, generator=torch.Generator().manual_seed(4))
    res = evaluate_windows(mod, windows, bos_id=None, reference=ref, progress=False)
    lp = F.log_softmax(mod.table[windows[:, :-1]][..., 10:], -1)
    ref_lp = F.log_softmax(ref.table[windows[:, :-1]][..., 10:], -1)
    assert math.isfinite(res.kld) and res.kld > 0
    assert res.kld == pytest.approx((ref_lp.exp() * (ref_lp - lp)).sum(-1).mean().item(), rel=1e-4)


# --- speed and memory helpers -------------------------------------------------------------


def test_forward_throughput(model) -> None:
    r = forward_throughput(model, seqlen=16, batch=2, repeats=3)
    assert r["tokens_per_second"] > 0
    assert len(r["seconds"]) == 3
    assert r["tokens_per_second"] == pytest.approx(32 / r["seconds_median"])


def test_measure_load_and_rss() -> None:
    value, seconds = measure_load(lambda: 42)
    assert value == 42 and seconds >= 0
    rss = process_rss_bytes()
    peak = peak_rss_bytes()
    assert peak > 0
    if rss is not None:
        assert 0 < rss <= peak

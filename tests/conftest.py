"""Shared fixtures: a tiny Llama model with a real (byte-level BPE) tokenizer, no network."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

WIKITEXT_VALID = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2" / "valid.txt"
TINY_VOCAB = 512
# Enough English for BPE to learn common merges; training takes well under a second.
_FALLBACK_TEXT = "The quick brown fox jumps over the lazy dog. " * 200


def _train_tokenizer(text: str):
    """A byte-level BPE tokenizer (any text encodes, no unknowns) with <s>, </s>, <pad>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([text], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved Hugging Face directory: a 2-layer random Llama (float32) and its tokenizer.

    Load it with `AutoModelForCausalLM.from_pretrained(d)` / `AutoTokenizer.from_pretrained(d)`
    or `lowbit.sources.load_model(str(d))`. Vocabulary 512 (model vocab_size matches),
    hidden 256, 4 heads / 2 KV heads, untied embeddings, seed 0. The tokenizer does not
    add BOS (like SmolLM2). Treat the directory as read-only: it is shared by the session.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    text = WIKITEXT_VALID.read_text(encoding="utf-8")[:20_000] if WIKITEXT_VALID.is_file() else _FALLBACK_TEXT
    tokenizer = _train_tokenizer(text)
    config = LlamaConfig(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    out = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


class LiveRecords:
    """A ``new_record`` for ``stream_input_statistics`` that counts how many of its records are alive
    at most (weak references, after a collection), for tests of the one-block memory bound."""

    def __init__(self) -> None:
        import weakref

        self.live: weakref.WeakSet = weakref.WeakSet()
        self.peak = 0

    def __call__(self):
        import gc

        from lowbit.pipeline.statistics import InputMoments

        gc.collect()
        record = InputMoments(hessian=True)
        self.live.add(record)
        self.peak = max(self.peak, len(self.live))
        return record


@pytest.fixture
def live_records() -> LiveRecords:
    return LiveRecords()

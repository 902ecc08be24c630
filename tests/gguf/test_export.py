"""GGUF export: tiny Llama and Gemma 3 models written, read back with gguf-py, loaded by transformers.

transformers' GGUF loader undoes llama.cpp's conventions (q/k row permutation, Gemma's +1 norms,
tensor names, tied output), so identical logits after a round trip check all of them at once.
The llama.cpp checks run when llama-cpp-python is installed; the SmolLM2 check when the demo model
is pulled (``lowbit pull smollm2-135m``).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from transformers import AutoModelForCausalLM, AutoTokenizer

import lowbit
from lowbit.gguf.export import export_gguf, plan_tensors
from lowbit.gguf.mixes import (
    FILE_TYPES,
    ModelShape,
    TensorSpec,
    tensor_type,
    use_more_bits,
)
from lowbit.sources import lowbit_home

TEXT = "The quick brown fox jumps over the lazy dog; then it rests.  Twice   the   spaces, 3.14 times."
HAVE_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
WIKITEXT_VALID = Path(__file__).resolve().parents[3] / "shared" / "data" / "wikitext-2" / "valid.txt"


def _field(reader: gguf.GGUFReader, key: str):
    f = reader.fields[key]
    if f.types[0] == gguf.GGUFValueType.ARRAY:
        return [f.contents(i) for i in range(len(f.data))]
    return f.contents()


def _perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random values everywhere (norm weights included, so a missed +1 or permutation shows)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim == 1 else 0.05))
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def llama(tiny_llama_dir: Path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    return _perturb(model, 1), AutoTokenizer.from_pretrained(tiny_llama_dir)


def _gemma_tokenizer():
    """A Gemma-style tokenizer: BPE over ``▁``-spelled text with byte fallback, trained in a blink."""
    from tokenizers import Tokenizer, models, normalizers, trainers
    from transformers import GemmaTokenizer

    text = WIKITEXT_VALID.read_text(encoding="utf-8")[:20_000] if WIKITEXT_VALID.is_file() else TEXT * 100
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.Replace(" ", "\u2581")
    bpe.train_from_iterator(text.split("\n"), trainers.BpeTrainer(vocab_size=300, show_progress=False))
    vocab = {s: i for i, s in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"])}
    vocab.update({f"<0x{b:02X}>": len(vocab) + b for b in range(256)})
    for piece in sorted(bpe.get_vocab(), key=bpe.get_vocab().get):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in json.loads(bpe.to_str())["model"]["merges"]]
    return GemmaTokenizer(vocab=vocab, merges=merges)


@pytest.fixture(scope="module")
def gemma():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tokenizer = _gemma_tokenizer()
    # 6 layers: llama.cpp's Gemma 3 pattern makes layer 5 global, so both RoPE bases are exercised;
    # a window of 8 tokens makes the sliding layers differ from full attention on TEXT.
    config = Gemma3TextConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=6, num_attention_heads=2,
                              num_key_value_heads=1, head_dim=256, vocab_size=len(tokenizer),
                              max_position_embeddings=512, sliding_window=8, bos_token_id=2, eos_token_id=1,
                              pad_token_id=0)
    torch.manual_seed(0)
    return _perturb(Gemma3ForCausalLM(config), 2), tokenizer


def _qwen2_tokenizer():
    """A Qwen2-style tokenizer: Qwen2's split regex, then byte-level BPE without its own regex."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lowbit.gguf.metadata import _QWEN2_SPLIT

    text = WIKITEXT_VALID.read_text(encoding="utf-8")[:20_000] if WIKITEXT_VALID.is_file() else TEXT * 100
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator([text], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")


@pytest.fixture(scope="module")
def qwen2():
    """A 2-layer Qwen2 with random q/k/v biases and RoPE base 1e6, as Qwen2.5's."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = _qwen2_tokenizer()
    config = Qwen2Config(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=512,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=False,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    return _perturb(Qwen2ForCausalLM(config), 3), tokenizer


def _logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def _load_gguf(path: Path):
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_llama_f32_metadata_names_and_permutation(llama, tmp_path):
    model, tokenizer = llama
    report = export_gguf(model, tokenizer, tmp_path / "m.gguf", "F32")
    r = gguf.GGUFReader(report.path)
    expect = {
        "general.architecture": "llama", "general.file_type": 0, "llama.block_count": 2,
        "llama.context_length": 512, "llama.embedding_length": 256, "llama.feed_forward_length": 512,
        "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2, "llama.rope.dimension_count": 64,
        "llama.vocab_size": len(tokenizer), "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.bos_token_id": tokenizer.bos_token_id, "tokenizer.ggml.eos_token_id": tokenizer.eos_token_id,
        "tokenizer.ggml.padding_token_id": tokenizer.pad_token_id, "tokenizer.ggml.add_bos_token": False,
    }
    assert {k: _field(r, k) for k in expect} == expect
    assert _field(r, "llama.rope.freq_base") == pytest.approx(model.config.rope_parameters["rope_theta"])
    assert _field(r, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(model.config.rms_norm_eps)
    assert "llama.attention.key_length" not in r.fields  # head_dim is llama.cpp's default hidden/heads
    vocab = tokenizer.get_vocab()
    assert _field(r, "tokenizer.ggml.tokens") == sorted(vocab, key=vocab.get)
    assert len(_field(r, "tokenizer.ggml.merges")) > 0

    tensors = {t.name: t for t in r.tensors}
    block = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
    assert set(tensors) == {"token_embd.weight", "output_norm.weight", "output.weight"} | {
        f"blk.{i}.{n}.weight" for i in range(2) for n in block}
    assert all(t.tensor_type == T.F32 for t in r.tensors)
    assert [t.shape.tolist() for t in r.tensors] == [list(reversed(t.shape)) for t in report.tensors]
    assert sum(t.nbytes for t in report.tensors) == sum(int(t.n_bytes) for t in r.tensors)
    assert report.file_size == report.path.stat().st_size and report.fallbacks == []

    attn = model.model.layers[1].self_attn
    q = np.asarray(tensors["blk.1.attn_q.weight"].data).reshape(attn.q_proj.weight.shape)
    k = np.asarray(tensors["blk.1.attn_k.weight"].data).reshape(attn.k_proj.weight.shape)
    np.testing.assert_array_equal(_unpermute(q, 4), attn.q_proj.weight.numpy())
    np.testing.assert_array_equal(_unpermute(k, 2), attn.k_proj.weight.numpy())
    np.testing.assert_array_equal(q, _permute(attn.q_proj.weight.numpy(), 4))
    assert not np.array_equal(q, attn.q_proj.weight.numpy())
    np.testing.assert_array_equal(np.asarray(tensors["blk.1.attn_v.weight"].data).reshape(-1, 256),
                                  attn.v_proj.weight.numpy())
    np.testing.assert_array_equal(np.asarray(tensors["output_norm.weight"].data), model.model.norm.weight.numpy())


def test_llama_round_trip_through_transformers(llama, tmp_path):
    model, tokenizer = llama
    path = export_gguf(model, tokenizer, tmp_path / "m.gguf", "F32").path
    ids = tokenizer(TEXT)["input_ids"]
    loaded = _load_gguf(path)
    assert not loaded.config.tie_word_embeddings
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), rtol=0, atol=1e-5)
    back = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert back(TEXT)["input_ids"] == ids


def test_qwen2_metadata_biases_and_unpermuted_rows(qwen2, tmp_path):
    model, tokenizer = qwen2
    report = export_gguf(model, tokenizer, tmp_path / "m.gguf", "F32")
    r = gguf.GGUFReader(report.path)
    expect = {"general.architecture": "qwen2", "qwen2.block_count": 2, "qwen2.embedding_length": 256,
              "qwen2.feed_forward_length": 512, "qwen2.attention.head_count": 4, "qwen2.attention.head_count_kv": 2,
              "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2", "tokenizer.ggml.add_bos_token": False}
    assert {k: _field(r, k) for k in expect} == expect
    assert _field(r, "qwen2.rope.freq_base") == 1e6
    tensors = {t.name: t for t in r.tensors}
    attn = model.model.layers[1].self_attn
    for name, linear in (("attn_q", attn.q_proj), ("attn_k", attn.k_proj), ("attn_v", attn.v_proj)):
        np.testing.assert_array_equal(np.asarray(tensors[f"blk.1.{name}.bias"].data), linear.bias.numpy())
        np.testing.assert_array_equal(np.asarray(tensors[f"blk.1.{name}.weight"].data).reshape(linear.weight.shape),
                                      linear.weight.numpy())  # llama.cpp's qwen2 rotates HF's layout as it is
    assert "blk.1.attn_output.bias" not in tensors


def test_qwen2_round_trip_through_transformers(qwen2, tmp_path):
    model, tokenizer = qwen2
    path = export_gguf(model, tokenizer, tmp_path / "m.gguf", "F32").path
    ids = tokenizer(TEXT)["input_ids"]
    torch.testing.assert_close(_logits(_load_gguf(path), ids), _logits(model, ids), rtol=0, atol=1e-5)
    assert AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)(TEXT)["input_ids"] == ids


def test_lazy_model_exports_tensor_by_tensor_to_the_same_bytes(tiny_llama_dir, monkeypatch, tmp_path):
    """A model whose weights stay on disk (load_lazy) writes what quantize_rows gives each whole
    tensor, though rows are encoded three at a time here."""
    from lowbit.gguf import blocks, export
    from lowbit.pipeline.lazy_model import load_lazy

    monkeypatch.setattr(export, "ENCODE_VALUES", 3 * 256)
    lazy = load_lazy(tiny_llama_dir)
    report = export_gguf(lazy, AutoTokenizer.from_pretrained(tiny_llama_dir), tmp_path / "m.gguf", "Q8_0")
    assert all(p.is_meta for p in lazy.parameters())  # read from the files, never loaded into the model
    eager = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    by_gguf = {p.spec.name: p.hf_name for p in export._plan(eager, export.architecture_of(eager),
                                                             export.file_type("Q8_0"), False)}
    params = dict(eager.named_parameters())
    written = {t.name: t for t in gguf.GGUFReader(report.path).tensors}
    assert set(written) == set(by_gguf)
    for name, t in written.items():
        w = params[by_gguf[name]].detach().numpy()
        if w.ndim == 1:
            np.testing.assert_array_equal(np.asarray(t.data), w)
            continue
        if name.startswith(("blk.0.attn_q", "blk.1.attn_q", "blk.0.attn_k", "blk.1.attn_k")):
            w = _permute(w, 4 if "attn_q" in name else 2)
        np.testing.assert_array_equal(np.asarray(t.data).reshape(-1), blocks.quantize_rows(w, T.Q8_0).reshape(-1))
    with pytest.raises(ValueError, match="lazily loaded"):
        export_gguf(lazy, None, tmp_path / "n.gguf", "Q8_0", statistics=[])


def test_gemma3_round_trip_norms_and_metadata(gemma, tmp_path):
    model, tokenizer = gemma
    report = export_gguf(model, tokenizer, tmp_path / "g.gguf", "F32")
    r = gguf.GGUFReader(report.path)
    expect = {
        "general.architecture": "gemma3", "gemma3.block_count": 6, "gemma3.embedding_length": 256,
        "gemma3.attention.key_length": 256, "gemma3.attention.value_length": 256,
        "gemma3.attention.head_count": 2, "gemma3.attention.head_count_kv": 1, "gemma3.attention.sliding_window": 8,
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default", "tokenizer.ggml.add_space_prefix": False,
    }
    assert {k: _field(r, k) for k in expect} == expect
    assert _field(r, "gemma3.rope.freq_base") == pytest.approx(1e6)
    assert _field(r, "gemma3.rope.freq_base_swa") == pytest.approx(1e4)
    types = _field(r, "tokenizer.ggml.token_type")
    scores = _field(r, "tokenizer.ggml.scores")
    assert types[:5] == [gguf.TokenType.CONTROL] * 5 and types[5:261] == [gguf.TokenType.BYTE] * 256
    assert scores[261:264] == [0.0, -1.0, -2.0]  # normal tokens: minus their rank, SentencePiece's order

    tensors = {t.name: t for t in r.tensors}
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    layer = model.model.layers[0]
    for name, norm in [("attn_norm", layer.input_layernorm), ("post_attention_norm", layer.post_attention_layernorm),
                       ("ffn_norm", layer.pre_feedforward_layernorm), ("post_ffw_norm", layer.post_feedforward_layernorm),
                       ("attn_q_norm", layer.self_attn.q_norm), ("attn_k_norm", layer.self_attn.k_norm)]:
        np.testing.assert_allclose(np.asarray(tensors[f"blk.0.{name}.weight"].data), norm.weight.numpy() + 1)
    q = np.asarray(tensors["blk.0.attn_q.weight"].data).reshape(layer.self_attn.q_proj.weight.shape)
    np.testing.assert_array_equal(q, layer.self_attn.q_proj.weight.numpy())  # Gemma: no permutation

    ids = tokenizer(TEXT)["input_ids"]
    assert len(ids) > 2 * model.config.sliding_window
    torch.testing.assert_close(_logits(_load_gguf(report.path), ids), _logits(model, ids), rtol=0, atol=1e-4)
    back = AutoTokenizer.from_pretrained(report.path.parent, gguf_file=report.path.name)
    assert back(TEXT, add_special_tokens=False)["input_ids"] == tokenizer(TEXT, add_special_tokens=False)["input_ids"]


def test_quantized_export_matches_plan_and_stays_close(llama, tmp_path):
    model, tokenizer = llama
    report = export_gguf(model, tokenizer, tmp_path / "q.gguf", "Q8_0")
    r = gguf.GGUFReader(report.path)
    assert {t.name: t.tensor_type.name for t in r.tensors} == {t.name: t.qtype for t in report.tensors}
    assert _field(r, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    attn = model.model.layers[0].self_attn
    q = next(t for t in r.tensors if t.name == "blk.0.attn_q.weight")
    w = _unpermute(gguf.quants.dequantize(q.data, q.tensor_type).reshape(attn.q_proj.weight.shape), 4)
    assert np.abs(w - attn.q_proj.weight.numpy()).max() < 0.01 * np.abs(w).max()
    ids = tokenizer(TEXT)["input_ids"]
    ref, got = _logits(model, ids), _logits(_load_gguf(report.path), ids)
    assert (ref.argmax(-1) == got.argmax(-1)).float().mean() > 0.9

    k_m = export_gguf(model, tokenizer, tmp_path / "k.gguf", "Q4_K_M")
    assert k_m.type_counts() == {"F32": 5, "Q4_K": 13, "Q6_K": 3}
    assert k_m.file_size < report.file_size and 4.5 < k_m.bits_per_weight < 6.5


def _tensor_bytes(path: Path, name: str) -> np.ndarray:
    return next(t for t in gguf.GGUFReader(path).tensors if t.name == name).data


def test_importance_reaches_the_quantizer_and_is_checked(llama, gemma, tmp_path):
    model, tokenizer = llama
    name = "model.layers.0.self_attn.q_proj"
    skew = np.linspace(0.01, 100, 256, dtype=np.float32)
    plain = export_gguf(model, tokenizer, tmp_path / "a.gguf", "Q4_K").path
    weighted = export_gguf(model, tokenizer, tmp_path / "b.gguf", "Q4_K", importance={name: skew}).path
    assert not np.array_equal(_tensor_bytes(plain, "blk.0.attn_q.weight"), _tensor_bytes(weighted, "blk.0.attn_q.weight"))
    np.testing.assert_array_equal(_tensor_bytes(plain, "blk.0.attn_k.weight"), _tensor_bytes(weighted, "blk.0.attn_k.weight"))
    with pytest.raises(ValueError, match="not weight matrices"):
        export_gguf(model, tokenizer, tmp_path / "c.gguf", "Q4_K", importance={"model.layers.0.q_proj": skew})
    with pytest.raises(ValueError, match=r"expected \(256,\)"):
        export_gguf(model, tokenizer, tmp_path / "c.gguf", "Q4_K", importance={name: skew[:10]})

    # a tied model: lm_head's statistics weight token_embd, the matrix llama.cpp multiplies by
    model, tokenizer = gemma
    plain = export_gguf(model, tokenizer, tmp_path / "d.gguf", "Q4_K").path
    weighted = export_gguf(model, tokenizer, tmp_path / "e.gguf", "Q4_K", importance={"lm_head": skew}).path
    assert not np.array_equal(_tensor_bytes(plain, "token_embd.weight"), _tensor_bytes(weighted, "token_embd.weight"))


def test_overwrite_is_refused_unless_asked(llama, tmp_path):
    model, tokenizer = llama
    path = tmp_path / "m.gguf"
    path.write_bytes(b"keep me")  # named .gguf, but not lowbit's to replace
    with pytest.raises(FileExistsError, match="--overwrite"):
        lowbit.export(model, tokenizer, path, to="gguf", type="F16")
    with pytest.raises(FileExistsError, match="remove it yourself"):
        lowbit.export(model, tokenizer, path, to="gguf", type="F16", overwrite=True)
    assert path.read_bytes() == b"keep me"
    path.write_bytes(b"GGUF, an older export")
    report = lowbit.export(model, tokenizer, path, to="gguf", type="F16", overwrite=True)
    assert gguf.GGUFReader(path).tensors[0].tensor_type in (T.F16, T.F32)
    assert report.type_counts() == {"F16": 16, "F32": 5}
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]  # no partial or lock file left behind


def test_unknown_architecture_and_type_are_rejected(llama, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=1, n_head=2, vocab_size=100, n_positions=32))
    with pytest.raises(ValueError, match=r"'gpt2'.*supported model types: llama, gemma3_text"):
        export_gguf(gpt2, llama[1], tmp_path / "x.gguf", "F16")
    with pytest.raises(ValueError, match=r"unknown GGUF type 'Q4_K_X'.*Q4_K_M"):
        export_gguf(llama[0], llama[1], tmp_path / "x.gguf", "Q4_K_X")
    assert not (tmp_path / "x.gguf").exists()


def test_q4_k_m_mix_on_the_two_layer_model(llama):
    plan = {gguf_name: (qtype, note) for _, gguf_name, _, qtype, note in plan_tensors(llama[0], "Q4_K_M")}
    # use_more_bits(i, 2) is True only for the last layer; every row here is a multiple of 256
    expect = {"token_embd.weight": "Q4_K", "output.weight": "Q6_K", "output_norm.weight": "F32",
              "blk.0.attn_v.weight": "Q4_K", "blk.1.attn_v.weight": "Q6_K",
              "blk.0.ffn_down.weight": "Q4_K", "blk.1.ffn_down.weight": "Q6_K",
              "blk.0.attn_q.weight": "Q4_K", "blk.1.ffn_gate.weight": "Q4_K", "blk.1.attn_norm.weight": "F32"}
    assert {n: plan[n][0] for n in expect} == expect
    assert all(note is None for _, note in plan.values())


# SmolLM2-135M's shapes (hidden 576, 30 layers, tied embeddings): 576 is not a multiple of 256.
SMOL = ModelShape(n_layers=30, tied_embeddings=True)
MORE = [i for i in range(30) if use_more_bits(i, 30)]
SMOL_SHAPES = {"attn_q": (576, 576), "attn_v": (192, 576), "attn_output": (576, 576), "ffn_up": (1536, 576),
               "ffn_down": (576, 1536), "attn_norm": (576,)}
MIX_CASES = [
    # (file type, tensor, layer, expected type, falls back)
    ("Q4_K_M", "token_embd", None, "Q8_0", False),  # tied, 576 % 256: llama.cpp picks Q8_0 outright
    ("Q4_K_M", "attn_q", 0, "Q5_0", True),
    ("Q4_K_M", "attn_v", 0, "Q8_0", True),  # more bits: Q6_K -> Q8_0
    ("Q4_K_M", "attn_v", 3, "Q5_0", True),
    ("Q4_K_M", "attn_v", 5, "Q8_0", True),
    ("Q4_K_M", "ffn_down", 5, "Q6_K", False),  # 1536 columns fit Q6_K
    ("Q4_K_M", "ffn_down", 6, "Q4_K", False),
    ("Q4_K_M", "ffn_down", 29, "Q6_K", False),
    ("Q4_K_M", "attn_output", 7, "Q5_0", True),
    ("Q4_K_M", "attn_norm", 7, "F32", False),
    ("Q3_K_M", "attn_v", 1, "Q5_1", True),  # Q5_K -> Q5_1
    ("Q3_K_M", "attn_v", 2, "Q5_0", True),  # Q4_K -> Q5_0
    ("Q3_K_M", "ffn_down", 0, "Q5_K", False),  # i < 30 // 16
    ("Q3_K_M", "ffn_down", 2, "Q4_K", False),
    ("Q3_K_M", "ffn_up", 2, "Q4_0", True),  # Q3_K -> Q4_0
    ("Q5_K_M", "ffn_down", 6, "Q5_K", False),
    ("Q5_K_M", "ffn_up", 6, "Q5_1", True),
    ("Q4_0", "token_embd", None, "Q4_0", False),  # plain types are --pure
    ("Q6_K", "ffn_up", 0, "Q8_0", True),
    ("F16", "ffn_up", 0, "F16", False),
    ("F16", "attn_norm", 0, "F32", False),
    ("IQ4_XS", "token_embd", None, "Q8_0", False),  # tied, 576 % 256: Q8_0 outright, as for the K_M mixes
    ("IQ4_NL", "token_embd", None, "Q8_0", True),  # 576 % 32 == 0, so Q6_K is chosen, then falls back
    ("IQ4_XS", "attn_q", 0, "IQ4_NL", True),
    ("IQ4_XS", "attn_v", 0, "IQ4_NL", True),  # SmolLM2's 3 heads per kv head: no Q5_K bump
    ("IQ4_XS", "ffn_down", 2, "Q5_K", False),  # i < 30 // 8 without an imatrix
    ("IQ4_XS", "ffn_down", 3, "IQ4_XS", False),
    ("IQ4_NL", "ffn_up", 3, "IQ4_NL", False),  # 32-value blocks tile 576
    ("MXFP4", "attn_v", 0, "MXFP4", False),
    ("MXFP4", "token_embd", None, "MXFP4", False),  # plain
    ("TQ2_0", "ffn_up", 4, "Q4_0", True),
    ("TQ1_0", "ffn_down", 4, "TQ1_0", False),
    ("IQ3_XXS", "attn_q", 4, "IQ4_NL", True),  # plain (llama-quantize --pure)
    ("IQ3_XXS", "ffn_down", 4, "IQ3_XXS", False),
    ("IQ2_XS", "token_embd", None, "Q8_0", False),  # tied, 576 % 256
    ("IQ2_XS", "attn_v", 9, "Q4_0", True),  # Q2_K (3 heads per kv head) -> Q4_0
    ("IQ2_XS", "ffn_down", 2, "Q2_K", False),  # i < 30 // 8
    ("IQ2_XS", "ffn_down", 3, "IQ2_XS", False),
    ("IQ2_XS", "attn_output", 3, "IQ4_NL", True),
]


@pytest.mark.parametrize(("ftype", "tensor", "layer", "expected", "falls_back"), MIX_CASES)
def test_mix_rules_on_the_30_layer_smollm2_shape(ftype, tensor, layer, expected, falls_back):
    name = "token_embd.weight" if layer is None else f"blk.{layer}.{tensor}.weight"
    shape = (49152, 576) if layer is None else SMOL_SHAPES[tensor]
    qtype, note = tensor_type(FILE_TYPES[ftype], TensorSpec(name, shape), SMOL)
    assert (qtype.name, note is not None) == (expected, falls_back)


def test_iq4_rules_that_depend_on_heads_and_the_imatrix():
    gqa4 = ModelShape(n_layers=30, tied_embeddings=False, n_gqa=4)  # Gemma-3-270M's 4 heads per kv head
    assert tensor_type(FILE_TYPES["IQ4_XS"], TensorSpec("blk.9.attn_v.weight", (256, 512)), gqa4) == (T.Q5_K, None)
    with_imatrix = ModelShape(n_layers=30, tied_embeddings=False, has_imatrix=True)
    down = TensorSpec("blk.0.ffn_down.weight", (576, 1536))
    assert tensor_type(FILE_TYPES["IQ4_XS"], down, with_imatrix) == (T.IQ4_XS, None)
    assert tensor_type(FILE_TYPES["IQ4_XS"], down, SMOL) == (T.Q5_K, None)
    embd = TensorSpec("token_embd.weight", (49152, 512))  # untied: ternary files keep it in Q4_K
    assert tensor_type(FILE_TYPES["TQ1_0"], embd, with_imatrix) == (T.Q4_K, None)


def test_iq2_xs_needs_an_importance_matrix(llama, tmp_path):
    model, tokenizer = llama
    with pytest.raises(ValueError, match="IQ2_XS needs an importance matrix"):
        export_gguf(model, tokenizer, tmp_path / "x.gguf", "IQ2_XS")
    assert not (tmp_path / "x.gguf").exists()
    skew = np.linspace(0.01, 100, 256, dtype=np.float32)
    report = export_gguf(model, tokenizer, tmp_path / "x.gguf", "IQ2_XS",
                         importance={"model.layers.0.self_attn.q_proj": skew})
    assert report.type_counts()["IQ2_XS"] > 0


def test_iq2_xs_export_without_calibration_is_refused_before_any_work(tmp_path):
    from lowbit.io.export import check_export

    with pytest.raises(ValueError, match="IQ2_XS needs an importance matrix, as in llama.cpp: add --imatrix or --gptq"):
        check_export("gguf", tmp_path / "x.gguf", overwrite=False, options={"type": "iq2_xs"})
    check_export("gguf", tmp_path / "x.gguf", overwrite=False, options={"type": "IQ2_XS", "gptq": True})


def test_use_more_bits_layers():
    assert MORE == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
    # Gemma-3-270M (18 layers): the attn_v/ffn_down layers llama-quantize's own Q4_K_M file upgrades
    assert [i for i in range(18) if use_more_bits(i, 18)] == [0, 1, 4, 7, 10, 13, 15, 16, 17]


def _smollm2_dir() -> Path:
    d = lowbit_home() / "models" / "smollm2-135m"
    if not (d / "hf" / "config.json").is_file() or not list((d / "gguf").glob("*.gguf")):
        pytest.skip("SmolLM2-135M is not pulled (lowbit pull smollm2-135m)")
    return d


@pytest.mark.real_model
def test_smollm2_q4_1_is_llama_cpps_own_file(tmp_path):
    """The demo's HF weights are its Q4_1 GGUF dequantized, so re-exporting them as Q4_1 must give
    llama.cpp's bytes back: same metadata keys, names, permutation and blocks, tensor by tensor.
    Only ``token_embd`` differs: llama-quantize moved it to Q8_0, lowbit's plain Q4_1 is --pure."""
    # transformers' reader parses the 100k-entry token arrays about 10x faster than gguf.GGUFReader
    from transformers.integrations.gguf import (
        GgufHeader,
        load_gguf_state_dict,
        read_gguf_metadata,
    )

    d = _smollm2_dir()
    model = AutoModelForCausalLM.from_pretrained(d / "hf", dtype=torch.float32)
    ours = export_gguf(model, AutoTokenizer.from_pretrained(d / "hf"), tmp_path / "s.gguf", "Q4_1").path
    reference = next((d / "gguf").glob("*.gguf"))
    arrays = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges")
    ref_keys, _ = read_gguf_metadata(str(reference), arrays)
    our_keys, _ = read_gguf_metadata(str(ours), arrays)
    keys = {k for k in ref_keys if not k.startswith("general.")}
    assert keys <= set(our_keys)
    assert {k: np.asarray(our_keys[k]).tolist() for k in keys} == {k: np.asarray(ref_keys[k]).tolist() for k in keys}
    assert our_keys["general.file_type"] == ref_keys["general.file_type"]

    ref_tensors = load_gguf_state_dict(GgufHeader.from_file(str(reference)))
    our_tensors = load_gguf_state_dict(GgufHeader.from_file(str(ours)))
    assert sorted(our_tensors) == sorted(ref_tensors)
    differ = [n for n, t in ref_tensors.items()
              if t.ggml_type != our_tensors[n].ggml_type or not np.array_equal(t.data, our_tensors[n].data)]
    assert differ == ["token_embd.weight"]


def _llama_cpp_logits(path: Path, ids: list[int]) -> torch.Tensor:
    from lowbit.gguf.llama_cpp import llama_cpp_logits

    return torch.from_numpy(next(llama_cpp_logits(path, [ids], n_threads=1)))


@pytest.mark.skipif(not HAVE_LLAMA_CPP, reason="llama-cpp-python is not installed (pip install 'lowbit[llama-cpp]')")
@pytest.mark.parametrize("which", ["llama", "gemma", "qwen2"])
def test_llama_cpp_runs_the_export_like_transformers(which, request, tmp_path):
    model, tokenizer = request.getfixturevalue(which)
    path = export_gguf(model, tokenizer, tmp_path / "m.gguf", "F32").path
    ids = tokenizer(TEXT)["input_ids"]
    got, want = _llama_cpp_logits(path, ids), _logits(model, ids)
    # llama.cpp keeps the KV cache in float16: differences of 1e-3 of the logits' range, where a wrong
    # permutation, norm offset, RoPE base or window would be of the order of the logits themselves
    assert (got - want).abs().max() < 1e-2 * want.abs().max()
    assert torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.skipif(not HAVE_LLAMA_CPP, reason="llama-cpp-python is not installed (pip install 'lowbit[llama-cpp]')")
@pytest.mark.parametrize("qtype", ["IQ4_XS", "IQ4_NL", "IQ3_XXS", "IQ2_XS", "MXFP4", "TQ2_0", "TQ1_0"])
def test_llama_cpp_decodes_the_new_types_as_gguf_py_does(llama, tmp_path, qtype):
    """llama.cpp's own kernels read lowbit's IQ4/IQ3_XXS/IQ2_XS/MXFP4/ternary blocks as gguf-py's dequantizer does."""
    model, tokenizer = llama
    importance = {"model.layers.0.mlp.down_proj": np.linspace(0.01, 100, 512, dtype=np.float32)}
    report = export_gguf(model, tokenizer, tmp_path / "m.gguf", qtype, importance=importance)
    assert qtype in report.type_counts()
    ids = tokenizer(TEXT)["input_ids"]
    got, want = _llama_cpp_logits(report.path, ids), _logits(_load_gguf(report.path), ids)
    # llama.cpp rounds activations to 8 bits for these dot products: measured 0.013 (MXFP4) .. 0.025 (TQ)
    # of the logits' range; a wrong block layout gives differences of the order of the logits
    assert (got - want).abs().max() < 5e-2 * want.abs().max()


def test_header_bytes_is_where_the_tensor_data_starts_with_the_sources_licence(tiny_llama_dir, tmp_path):
    """A size budget subtracts ``header_bytes``: it must count the licence and base-model name the
    export writes (it once did not, and an allocated file came out 192 bytes over its target)."""
    import shutil

    from lowbit.gguf.export import header_bytes

    src = tmp_path / "licensed"
    shutil.copytree(tiny_llama_dir, src)
    (src / "README.md").write_text("---\nlicense: apache-2.0\nbase_model: test/a-rather-long-base-model-name\n---\n")
    model, tokenizer = lowbit.load(str(src))
    path = tmp_path / "m.gguf"
    export_gguf(model, tokenizer, path, "Q8_0")
    reader = gguf.GGUFReader(path)
    assert str(bytes(reader.fields["general.license"].parts[-1]), "utf-8") == "apache-2.0"
    assert header_bytes(model, tokenizer, "Q8_0") == min(t.data_offset for t in reader.tensors)

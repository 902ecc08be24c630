"""A quantized .gguf read as lowbit codes: each mapped type dequantizes as transformers' GGUF loader
(gguf-py's dequantizer) does, bit for bit; written back, its tensors are the file's bytes; bad files are
refused in one line."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

import lowbit
from lowbit.cli import main
from lowbit.gguf.export import export_gguf
from lowbit.gguf.quantized_model import load_gguf_codes
from lowbit.nn import QuantLinear

# every mapped type on some layer of the tiny Llama (hidden 256: K types fit), and two that are not codes
TYPES = {
    "model.layers.0.self_attn.q_proj.weight": "Q4_K", "model.layers.0.self_attn.k_proj.weight": "Q6_K",
    "model.layers.0.self_attn.v_proj.weight": "Q3_K", "model.layers.0.self_attn.o_proj.weight": "Q2_K",
    "model.layers.0.mlp.gate_proj.weight": "Q5_K", "model.layers.0.mlp.up_proj.weight": "IQ4_XS",
    "model.layers.0.mlp.down_proj.weight": "IQ4_NL", "model.layers.1.self_attn.q_proj.weight": "Q4_0",
    "model.layers.1.self_attn.k_proj.weight": "Q5_0", "model.layers.1.self_attn.v_proj.weight": "Q4_1",
    "model.layers.1.self_attn.o_proj.weight": "Q5_1", "model.layers.1.mlp.gate_proj.weight": "Q8_0",
    "model.layers.1.mlp.up_proj.weight": "Q4_K", "model.layers.1.mlp.down_proj.weight": "Q6_K",
    "lm_head.weight": "TQ2_0", "model.embed_tokens.weight": "Q8_0",
}


@pytest.fixture(scope="module")
def mixed_gguf(tiny_llama_dir, tmp_path_factory):
    model, tokenizer = lowbit.load(str(tiny_llama_dir))
    path = tmp_path_factory.mktemp("gguf_in") / "mixed.gguf"
    export_gguf(model, tokenizer, path, "Q8_0", tensor_types=TYPES)
    return path


def _tensors(path) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def test_mapped_types_load_as_codes_that_dequantize_as_gguf_py(mixed_gguf):
    with pytest.warns(UserWarning, match=r"2 quantized tensors have no lowbit codes .*output.weight \(TQ2_0\)"):
        model, tokenizer = load_gguf_codes(mixed_gguf)
    floats, _ = lowbit.load(str(mixed_gguf), dequantize=True)  # transformers' loader: gguf-py's dequantizer
    reference = dict(floats.named_parameters())
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(layers) == 14 and isinstance(model.lm_head, torch.nn.Linear)  # TQ2_0: float
    for name, layer in layers.items():
        want = reference[name + ".weight"]
        assert torch.equal(layer.quantized_weight().dequantize(), want), name
    ids = torch.randint(3, 400, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, floats(ids).logits)
    from transformers import AutoTokenizer

    gguf_tokenizer = AutoTokenizer.from_pretrained(mixed_gguf.parent, gguf_file=mixed_gguf.name)
    assert tokenizer("hello world")["input_ids"] == gguf_tokenizer("hello world")["input_ids"]


def _source_tokenizer(tiny_llama_dir):
    """The tiny model's own tokenizer: transformers' GGUF tokenizer reader adds an ``<|endoftext|>`` this
    512-token vocabulary lacks, which the GGUF writer refuses (a tokenizer larger than the embedding)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def test_written_back_every_mapped_tensor_is_the_files_bytes(mixed_gguf, tiny_llama_dir, tmp_path):
    with pytest.warns(UserWarning):
        model, _ = lowbit.load(str(mixed_gguf))
    lowbit.export(model, _source_tokenizer(tiny_llama_dir), tmp_path / "again.gguf", to="gguf")
    before, after = _tensors(mixed_gguf), _tensors(tmp_path / "again.gguf")
    assert set(before) == set(after)
    for name, t in before.items():
        if name in ("output.weight", "token_embd.weight"):
            continue  # dequantized on the way in: re-quantized by the file type's rules on the way out
        assert after[name].tensor_type == t.tensor_type, name
        assert np.array_equal(np.asarray(after[name].data), np.asarray(t.data)), name


def test_a_tied_embedding_reads_the_heads_codes(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, tie_word_embeddings=True)
    model.tie_weights()
    tokenizer = _source_tokenizer(tiny_llama_dir)
    export_gguf(model, tokenizer, tmp_path / "tied.gguf", "Q8_0")
    assert "output.weight" not in _tensors(tmp_path / "tied.gguf")
    loaded, _ = lowbit.load(str(tmp_path / "tied.gguf"))
    assert type(loaded.model.embed_tokens).__name__ == "QuantEmbedding"
    assert isinstance(loaded.lm_head, QuantLinear) and loaded.lm_head.quantized_weight().scheme.describe() == "int8 g32"
    lowbit.export(loaded, tokenizer, tmp_path / "again.gguf", to="gguf")
    before, after = _tensors(tmp_path / "tied.gguf"), _tensors(tmp_path / "again.gguf")
    assert all(np.array_equal(np.asarray(after[n].data), np.asarray(t.data)) for n, t in before.items())


def test_bad_files_are_refused_in_one_line(mixed_gguf, tmp_path, capsys):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(mixed_gguf.read_bytes()[:-1000])
    with pytest.raises(ValueError, match="truncated"):
        load_gguf_codes(cut)
    other = tmp_path / "rwkv.gguf"
    writer = gguf.GGUFWriter(str(other), "rwkv6")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="GGUF architecture 'rwkv6' has no model lowbit can build"):
        load_gguf_codes(other)
    assert main(["eval", str(cut), "--max-windows", "1", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "truncated" in err[0]


def test_a_gguf_read_as_codes_saves_as_a_lowbit_checkpoint(mixed_gguf, tmp_path):
    from lowbit.io.checkpoint import load_quantized

    with pytest.warns(UserWarning):
        model, tokenizer = lowbit.load(str(mixed_gguf))
    lowbit.export(model, tokenizer, tmp_path / "ckpt", to="lowbit", recipe=lowbit.Recipe())  # each layer's own scheme
    again, _ = load_quantized(tmp_path / "ckpt")
    before = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    after = {n: m for n, m in again.named_modules() if isinstance(m, QuantLinear)}
    assert set(before) == set(after)
    for name, layer in before.items():
        assert after[name].quantized_weight().scheme == layer.quantized_weight().scheme, name
        assert torch.equal(after[name].quantized_weight().dequantize(), layer.quantized_weight().dequantize()), name


def test_export_to_lowbit_from_the_command_line_records_the_imported_schemes(mixed_gguf, tmp_path, capsys):
    """``lowbit export FILE.gguf --to lowbit``: the checkpoint's recipe names every layer's scheme as read
    (float where the file's type has no lowbit codes) and says the codes were imported, not made by it."""
    from lowbit.io.checkpoint import load_quantized, read_quantization_config

    with pytest.warns(UserWarning):
        assert main(["export", str(mixed_gguf), "--to", "lowbit", "-o", str(tmp_path / "ckpt"), "--quiet"]) == 0
    recorded = read_quantization_config(tmp_path / "ckpt")
    recipe = lowbit.Recipe.from_dict(recorded["recipe"])
    assert "imported" in recorded["calibration"] and str(mixed_gguf) in recorded["calibration"]["imported"]
    again, _ = load_quantized(tmp_path / "ckpt")
    for name, module in again.named_modules():
        if isinstance(module, (QuantLinear, torch.nn.Linear)):
            want = module.quantized_weight().scheme if isinstance(module, QuantLinear) else None
            assert recipe.scheme_for(name) == want, name

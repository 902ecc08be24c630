import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

import lowbit.io.checkpoint as ckpt
from lowbit.api import load, quantize
from lowbit.io.checkpoint import checkpoint_info, load_quantized, save_quantized
from lowbit.nn import QuantLinear
from lowbit.pipeline.recipe import Override, Recipe
from lowbit.scheme import QuantScheme

RECIPE = Recipe(default=QuantScheme(bits=4, group_size=64, symmetric=False),
                overrides=(Override(r"down_proj", QuantScheme(format="nf4", group_size=32, double_quant=True)),))


@pytest.fixture(scope="module")
def saved(tiny_llama_dir, tmp_path_factory):
    model, tokenizer = load(str(tiny_llama_dir))
    quantize(model, RECIPE, progress=False)
    out = tmp_path_factory.mktemp("ckpt") / "q"
    save_quantized(model, out, recipe=RECIPE, tokenizer=tokenizer)
    return model, out


def test_round_trip_logits_are_bit_identical(saved):
    model, out = saved
    loaded, tokenizer = load_quantized(out)
    assert tokenizer is not None
    ids = torch.randint(0, model.config.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert isinstance(loaded.model.layers[1].mlp.down_proj, QuantLinear)
    assert loaded.model.layers[1].mlp.down_proj.scheme.describe() == "nf4 g32 dq"
    assert isinstance(loaded.lm_head, torch.nn.Linear)


def test_config_records_recipe_and_layers(saved):
    _, out = saved
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "lowbit" and qc["recipe"] == RECIPE.to_dict()
    assert qc["layers"]["model.layers.0.self_attn.q_proj"]["shape"] == [256, 256]
    info = checkpoint_info(out)
    assert info["quantized_layers"] == 14
    by_name = {r["name"]: r for r in info["layers"]}
    assert by_name["model.layers.0.self_attn.q_proj"]["bpw"] == 4 + 16 / 64 + 4 / 64


def test_truncated_file_is_refused(saved, tmp_path):
    _, out = saved
    copy = tmp_path / "c"
    shutil.copytree(out, copy)
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(ValueError, match="corrupt"):
        load_quantized(copy)
    with pytest.raises(ValueError, match="truncated or not safetensors"):
        load_quantized(copy, verify=False)


def test_tampered_file_is_refused(saved, tmp_path):
    _, out = saved
    copy = tmp_path / "c"
    shutil.copytree(out, copy)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="model.safetensors differs from the checkpoint.s manifest"):
        load_quantized(copy)


def test_existing_output_is_refused_and_overwrite_replaces(saved, tmp_path):
    model, _ = saved
    target = tmp_path / "out"
    save_quantized(model, target, recipe=RECIPE)
    with pytest.raises(FileExistsError, match="--overwrite"):
        save_quantized(model, target, recipe=RECIPE)
    (target / "model.safetensors").write_bytes(b"stale")
    save_quantized(model, target, recipe=RECIPE, overwrite=True)
    load_quantized(target)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no partial, old copy or lock file beside it


def test_overwrite_refuses_a_directory_lowbit_did_not_write(saved, tmp_path):
    model, _ = saved
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a lowbit checkpoint, adapter or GGUF file"):
        save_quantized(model, target, recipe=RECIPE, overwrite=True)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]


def test_failed_save_leaves_nothing(saved, tmp_path, monkeypatch):
    model, _ = saved

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", explode)
    with pytest.raises(OSError, match="disk full"):
        save_quantized(model, tmp_path / "out", recipe=RECIPE)
    assert list(tmp_path.iterdir()) == []


def test_float_directory_is_not_a_lowbit_checkpoint(tiny_llama_dir):
    with pytest.raises(ValueError, match="not a lowbit checkpoint"):
        load_quantized(tiny_llama_dir)


def test_tied_embeddings_are_stored_once_and_retied(tmp_path):
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    quantize(model, Recipe(), progress=False)
    save_quantized(model, tmp_path / "t", recipe=Recipe())
    loaded, _ = load_quantized(tmp_path / "t")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ids = torch.arange(16)[None]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_same_inputs_give_byte_identical_checkpoints(tiny_llama_dir, tmp_path):
    for name in ("a", "b"):
        model, tokenizer = load(str(tiny_llama_dir))
        quantize(model, RECIPE, progress=False)
        save_quantized(model, tmp_path / name, recipe=RECIPE, tokenizer=tokenizer)
    for file in ("model.safetensors", "config.json"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes()

"""The manifest (``lowbit.io.manifest``): every loader refuses a checkpoint whose config or weights differ
from what lowbit wrote, or whose manifest is gone; ``verify=False`` / ``--no-verify`` opt out; checkpoints
of format 1 load with a warning. The CLI runs in-process through ``main``."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

import lowbit
from lowbit.cli import main
from lowbit.io.checkpoint import checkpoint_info, load_quantized, save_quantized
from lowbit.io.manifest import file_sha256

RECIPE = lowbit.Recipe(default=lowbit.QuantScheme(format="int", bits=4, group_size=64, symmetric=True))
LAYER = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def checkpoint(tiny_llama_dir, tmp_path_factory):
    model, tokenizer = lowbit.load(str(tiny_llama_dir))
    lowbit.quantize(model, RECIPE, progress=False)
    out = tmp_path_factory.mktemp("manifest") / "q"
    save_quantized(model, out, recipe=RECIPE, tokenizer=tokenizer)
    return out


@pytest.fixture
def copy(checkpoint, tmp_path):
    """A private copy of the checkpoint, to edit."""
    return shutil.copytree(checkpoint, tmp_path / "c")


def _edit_config(path, edit) -> None:
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config, indent=2))


def _flip_bytes(path, count: int = 4096) -> None:
    """Invert ``count`` bytes in the middle of ``path`` (same size, so only a hash can tell)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + count] = bytes(b ^ 0xFF for b in data[middle:middle + count])
    path.write_bytes(bytes(data))


def _make_legacy(path, *, with_sha256: bool) -> None:
    """Turn a checkpoint into one as format 1 wrote it: no manifest, a SHA-256 of the weights at most."""
    def edit(config):
        qc = config["quantization_config"]
        qc["version"] = 1
        del qc["manifest"]
        if with_sha256:
            qc["sha256"] = {"model.safetensors": file_sha256(path / "model.safetensors")}
    _edit_config(path, edit)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


def test_manifest_covers_config_and_weights(checkpoint):
    manifest = json.loads((checkpoint / "config.json").read_text())["quantization_config"]["manifest"]
    assert manifest["version"] == 1 and sorted(manifest["sha256"]) == ["config.json", "model.safetensors"]
    assert manifest["sha256"]["model.safetensors"] == file_sha256(checkpoint / "model.safetensors")
    load_quantized(checkpoint)


def test_reformatting_the_config_keeps_it_valid(copy):
    _edit_config(copy, lambda config: None)  # other indentation and key order, same values
    load_quantized(copy)


@pytest.mark.parametrize("edit", [
    lambda c: c["quantization_config"]["layers"][LAYER]["scheme"].update(format="nf4"),
    lambda c: c["quantization_config"]["layers"][LAYER].update(input_hadamard=True),
    lambda c: c.update(rms_norm_eps=0.1),
], ids=["format int -> nf4", "input_hadamard", "model setting"])
def test_an_edited_config_is_refused_naming_it(copy, edit):
    _edit_config(copy, edit)
    with pytest.raises(ValueError, match=r"config.json differs from the checkpoint's manifest.*--no-verify"):
        load_quantized(copy)
    with pytest.raises(ValueError, match="config.json differs"):
        checkpoint_info(copy)


def test_flipped_weight_bytes_are_refused_naming_the_file(copy):
    _flip_bytes(copy / "model.safetensors")
    with pytest.raises(ValueError, match=r"model.safetensors differs from the checkpoint's manifest"):
        lowbit.load(copy)


def test_a_weights_file_added_after_the_save_is_refused(copy):
    shutil.copy(copy / "model.safetensors", copy / "model-extra.safetensors")
    with pytest.raises(ValueError, match="model-extra.safetensors is not in the checkpoint's manifest"):
        load_quantized(copy)


def test_a_removed_manifest_is_refused_in_the_current_format(copy):
    _edit_config(copy, lambda c: c["quantization_config"].pop("manifest"))
    with pytest.raises(ValueError, match="has no valid manifest.*removed or edited"):
        load_quantized(copy)
    _edit_config(copy, lambda c: c["quantization_config"].pop("version"))  # nor does hiding the format help
    with pytest.raises(ValueError, match="written by checkpoint format None"):
        load_quantized(copy)


def test_verify_false_loads_an_edited_checkpoint(copy):
    _edit_config(copy, lambda c: c.update(rms_norm_eps=0.1))
    model, _ = load_quantized(copy, verify=False)
    assert model.config.rms_norm_eps == 0.1
    _edit_config(copy, lambda c: c["quantization_config"].pop("manifest"))
    load_quantized(copy, verify=False)
    assert isinstance(model.get_submodule(LAYER), lowbit.nn.QuantLinear)


def test_a_legacy_checkpoint_loads_with_a_warning_and_its_sha256_still_counts(copy):
    _make_legacy(copy, with_sha256=True)
    with pytest.warns(UserWarning, match="format 1, written before checkpoints carried a manifest: only its weights"):
        load_quantized(copy)
    _flip_bytes(copy / "model.safetensors")
    with pytest.raises(ValueError, match="model.safetensors is corrupt"):
        load_quantized(copy)


def test_a_legacy_checkpoint_without_sha256_warns_that_nothing_was_checked(copy):
    _make_legacy(copy, with_sha256=False)
    with pytest.warns(UserWarning, match="none of it could be checked"):
        checkpoint_info(copy)


def test_info_exits_2_on_an_edited_or_corrupt_checkpoint_and_no_verify_opts_out(copy, capsys):
    _edit_config(copy, lambda c: c["quantization_config"]["layers"][LAYER]["scheme"].update(format="nf4"))
    assert main(["info", str(copy)]) == 2
    assert "config.json differs from the checkpoint's manifest" in _one_line_error(capsys)
    assert main(["info", str(copy), "--no-verify", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["quantized_layers"] == 14


def test_eval_refuses_flipped_weights(copy, tmp_path, capsys):
    _flip_bytes(copy / "model.safetensors")
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 50)
    assert main(["eval", str(copy), "--data", str(text), "--seqlen", "32", "--max-windows", "1", "--quiet"]) == 2
    assert "model.safetensors differs from the checkpoint's manifest" in _one_line_error(capsys)


def test_from_pretrained_refuses_an_edited_checkpoint(checkpoint, copy):
    loaded = AutoModelForCausalLM.from_pretrained(checkpoint)  # the intact one loads
    assert isinstance(loaded.get_submodule(LAYER), lowbit.nn.QuantLinear)
    _edit_config(copy, lambda c: c["quantization_config"]["layers"][LAYER].update(input_hadamard=True))
    with pytest.raises(ValueError, match="config.json differs from the checkpoint's manifest"):
        AutoModelForCausalLM.from_pretrained(copy)


def test_from_pretrained_warns_on_a_legacy_checkpoint(copy):
    _make_legacy(copy, with_sha256=True)
    with pytest.warns(UserWarning, match="written before checkpoints carried a manifest"):
        AutoModelForCausalLM.from_pretrained(copy)


def test_save_pretrained_writes_the_manifest_atomically(tiny_llama_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir,
                                                 quantization_config=lowbit.LowbitConfig(load_in_4bit=True))
    target = tmp_path / "sp"
    target.mkdir()  # an empty directory, as tempfile.TemporaryDirectory gives, is fine
    model.save_pretrained(target)
    assert [p.name for p in tmp_path.iterdir()] == ["sp"]  # no partial or lock beside it
    qc = json.loads((target / "config.json").read_text())["quantization_config"]
    assert qc["version"] == 2 and "sha256" not in qc and "model.safetensors" in qc["manifest"]["sha256"]
    again, _ = lowbit.load(target)
    ids = torch.arange(3, 40)[None]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # the current format: no legacy warning
        assert torch.equal(AutoModelForCausalLM.from_pretrained(target)(ids).logits, model(ids).logits)
        assert torch.equal(again(ids).logits, model(ids).logits)
    model.save_pretrained(target)  # over its own earlier save: replaced
    _flip_bytes(target / "model.safetensors")
    with pytest.raises(ValueError, match="model.safetensors differs from the checkpoint's manifest"):
        lowbit.load(target)


def test_a_sharded_save_pretrained_covers_its_shards_and_index(tiny_llama_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir,
                                                 quantization_config=lowbit.LowbitConfig(load_in_8bit=True))
    model.save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    recorded = json.loads((tmp_path / "sharded" / "config.json").read_text())["quantization_config"]["manifest"]
    assert "model.safetensors.index.json" in recorded["sha256"] and len(recorded["sha256"]) > 3
    AutoModelForCausalLM.from_pretrained(tmp_path / "sharded")
    index = tmp_path / "sharded" / "model.safetensors.index.json"
    index.write_text(index.read_text().replace("\n", "\n "))
    with pytest.raises(ValueError, match="model.safetensors.index.json differs from the checkpoint's manifest"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "sharded")


def test_save_pretrained_leaves_a_directory_lowbit_did_not_write(tiny_llama_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir,
                                                 quantization_config=lowbit.LowbitConfig(load_in_8bit=True))
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a lowbit checkpoint"):
        model.save_pretrained(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]

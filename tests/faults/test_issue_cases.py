"""The cases issue 16 lists, each as a probe (CLI, in-process) or an API refusal: full disks,
read-only and odd outputs, hostile files, encoders, NaN weights, contradictory options, bad
scheme types, Ctrl-C. Whatever they do, it is one line (exit 2, 130 for Ctrl-C), never a
traceback, and nothing at the output name."""

from __future__ import annotations

import dataclasses
import errno
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lowbit.scheme import QuantScheme

ENOSPC = OSError(errno.ENOSPC, "No space left on device")


def _quantize(src, out, *extra):
    return ["quantize", src, "-o", out, "--group-size", "32", "--quiet", *extra]


def _copy(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


def _edit_config(directory: Path, edit) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


# ---- outputs ----

def test_overwrite_leaves_what_lowbit_did_not_write(mini_llama_dir, tmp_path, probe):
    out = tmp_path / "v"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    probe(_quantize(mini_llama_dir, out, "--overwrite"), keep=(out / "keep.txt",))


def test_overwrite_replaces_a_lowbit_checkpoint_which_then_verifies(mini_llama_dir, mini_checkpoint, tmp_path, probe):
    out = _copy(mini_checkpoint, tmp_path / "q")
    probe(_quantize(mini_llama_dir, out, "--bits", "8", "--overwrite"), expect=0, outputs=(out,))


@pytest.mark.parametrize("out", ["/sys/lowbit-probe", "/proc/lowbit-probe", "{file}/sub"])
def test_an_output_that_cannot_be_written(out, mini_llama_dir, tmp_path, probe):
    (tmp_path / "file").write_text("x")
    out = Path(out.format(file=tmp_path / "file"))
    probe(_quantize(mini_llama_dir, out), outputs=(out,) if out.parent.is_dir() else ())


def test_export_gguf_onto_a_directory_with_overwrite(mini_llama_dir, tmp_path, probe):
    out = tmp_path / "d"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    probe(["export-gguf", mini_llama_dir, "-o", out, "--type", "Q8_0", "--overwrite", "--quiet"],
          keep=(out / "keep.txt",))


@pytest.mark.parametrize("where", ["weights", "tokenizer", "gguf"])
def test_a_full_disk(where, mini_llama_dir, tmp_path, probe, monkeypatch):
    """ENOSPC while writing the weights, the tokenizer or a GGUF: one line, nothing at the output."""
    def full(*args, **kwargs):
        raise ENOSPC

    if where == "weights":
        monkeypatch.setattr("lowbit.io.checkpoint.save_file", full)
    elif where == "tokenizer":
        monkeypatch.setattr("transformers.PreTrainedTokenizerBase.save_pretrained", full)
    else:
        monkeypatch.setattr("gguf.GGUFWriter.write_tensor_data", full)
    out, gguf = tmp_path / "out", tmp_path / "out.gguf"
    written = (out,) if where == "gguf" else ()  # the checkpoint is complete before the GGUF is begun
    o = probe(_quantize(mini_llama_dir, out, "--gguf", gguf, "--gguf-type", "Q8_0"),
              outputs=tuple(p for p in (out, gguf) if p not in written))
    assert "No space left on device" in o.lines[0]
    if written:
        from lowbit.io.checkpoint import read_quantization_config

        read_quantization_config(out)  # complete and verified, and the line says how to write the GGUF
        assert f"{out} was written" in o.lines[0]


def test_lowbit_home_that_is_a_file(tmp_path, probe, monkeypatch):
    (tmp_path / "home").write_text("x")
    monkeypatch.setenv("LOWBIT_HOME", str(tmp_path / "home"))
    probe(["pull", "smollm2-135m", "--quiet"])


def test_ctrl_c_is_one_line_and_130(mini_llama_dir, tmp_path, probe, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("lowbit.api.quantize_sequential", interrupted)
    out = tmp_path / "out"
    o = probe(_quantize(mini_llama_dir, out), expect=130, outputs=(out,))
    assert "interrupted" in o.lines[0]


# ---- hostile or broken source models ----

def _safetensors_with_header(path: Path, header: bytes, length: int | None = None) -> None:
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header)


@pytest.mark.parametrize("kind", ["truncated", "bad header", "2^40 header", "empty"])
def test_broken_float_safetensors(kind, mini_llama_dir, tmp_path, probe):
    src = _copy(mini_llama_dir, tmp_path / "src")
    weights = src / "model.safetensors"
    if kind == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif kind == "bad header":
        _safetensors_with_header(weights, b"{not json")
    elif kind == "2^40 header":
        _safetensors_with_header(weights, b"{}", length=2**40)
    else:
        weights.write_bytes(b"")
    out = tmp_path / "out"
    probe(_quantize(src, out), outputs=(out,))


@pytest.mark.parametrize("command", ["quantize", "eval", "finetune"])
def test_a_directory_whose_weights_are_a_pickle(command, mini_llama_dir, text_file, tmp_path, probe):
    src = _copy(mini_llama_dir, tmp_path / "src")
    torch.save(load_file(src / "model.safetensors"), src / "pytorch_model.bin")
    (src / "model.safetensors").unlink()
    out = tmp_path / "out"
    argv = {"quantize": _quantize(src, out),
            "eval": ["eval", src, "--data", text_file, "--quiet"],
            "finetune": ["finetune", src, "--data", text_file, "-o", out, "--quiet"]}[command]
    o = probe(argv, outputs=(out,))
    assert "pytorch_model.bin is a pickle file" in o.lines[0]


def test_finetune_resume_from_a_pickle_adapter(mini_llama_dir, text_file, tmp_path, probe):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    torch.save({}, adapter / "adapter_model.bin")
    (adapter / "adapter_config.json").write_text("{}")
    out = tmp_path / "out"
    probe(["finetune", mini_llama_dir, "--data", text_file, "-o", out, "--resume", adapter, "--quant", "none",
           "--steps", "1", "--seqlen", "16", "--batch-size", "1", "--eval-windows", "0", "--quiet"], outputs=(out,))


@pytest.mark.parametrize("content", [b"{", b"[1, 2]", b"\xff\xfe{}", b"", b'{"model_type": 5}',
                                     b'{"model_type": "llama", "hidden_size": "wide"}'])
def test_an_invalid_config_json_is_named(content, mini_llama_dir, tmp_path, probe):
    src = _copy(mini_llama_dir, tmp_path / "src")
    (src / "config.json").write_bytes(content)
    out = tmp_path / "out"
    o = probe(_quantize(src, out), outputs=(out,))
    assert "config.json" in o.lines[0] or str(src) in o.lines[0]


@pytest.mark.parametrize("tensor", ["model.norm.weight", "model.embed_tokens.weight",
                                    "model.layers.0.input_layernorm.weight", "model.layers.0.mlp.up_proj.weight"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_tensor_anywhere_in_the_source_is_refused(tensor, value, mini_llama_dir, text_file, tmp_path,
                                                               probe):
    src = _copy(mini_llama_dir, tmp_path / "src")
    state = load_file(src / "model.safetensors")
    state[tensor].view(-1)[3] = value
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    assert tensor in probe(_quantize(src, out), outputs=(out,)).lines[0]
    assert tensor in probe(["eval", src, "--data", text_file, "--seqlen", "32", "--json", "--quiet"]).lines[0]


@pytest.fixture(scope="module")
def encoder_dirs(mini_llama_dir, tmp_path_factory) -> dict[str, Path]:
    """A tiny BERT masked LM and a tiny T5, each with the mini model's tokenizer files."""
    from transformers import BertConfig, BertForMaskedLM, T5Config, T5ForConditionalGeneration

    dirs = {}
    for name, model in [
        ("bert", BertForMaskedLM(BertConfig(vocab_size=512, hidden_size=32, num_hidden_layers=1,
                                            num_attention_heads=2, intermediate_size=64))),
        ("t5", T5ForConditionalGeneration(T5Config(vocab_size=512, d_model=32, d_ff=64, num_layers=1,
                                                   num_heads=2, d_kv=16))),
    ]:
        out = tmp_path_factory.mktemp(name)
        model.save_pretrained(out)
        for f in mini_llama_dir.glob("tokenizer*"):
            shutil.copy(f, out)
        dirs[name] = out
    return dirs


@pytest.mark.parametrize("name", ["bert", "t5"])
@pytest.mark.parametrize("command", ["quantize", "eval"])
def test_encoders_and_encoder_decoders_are_refused_up_front(name, command, encoder_dirs, text_file, tmp_path, probe):
    out = tmp_path / "out"
    argv = _quantize(encoder_dirs[name], out) if command == "quantize" else \
        ["eval", encoder_dirs[name], "--data", text_file, "--quiet"]
    o = probe(argv, outputs=(out,))
    assert "decoder-only" in o.lines[0]


# ---- lowbit checkpoints ----

@pytest.mark.parametrize("edit", ["layers null", "no such layer", "layers list", "scheme bits 4.5",
                                  "shape wrong", "recipe number", "version 9", "quantization_config list"])
@pytest.mark.parametrize("verify", [True, False])
def test_an_edited_quantization_config(edit, verify, mini_checkpoint, text_file, tmp_path, probe):
    ckpt = _copy(mini_checkpoint, tmp_path / "q")

    def change(config):
        qc = config["quantization_config"]
        first = next(iter(qc["layers"]))
        if edit == "layers null":
            qc["layers"] = None
        elif edit == "no such layer":
            qc["layers"]["model.layers.7.mlp.nope"] = qc["layers"].pop(first)
        elif edit == "layers list":
            qc["layers"] = list(qc["layers"])
        elif edit == "scheme bits 4.5":
            qc["layers"][first]["scheme"]["bits"] = 4.5
        elif edit == "shape wrong":
            qc["layers"][first]["shape"] = [1, 2, 3]
        elif edit == "recipe number":
            qc["recipe"] = 5
        elif edit == "version 9":
            qc["version"] = 9
        else:
            config["quantization_config"] = [qc]

    _edit_config(ckpt, change)
    tail = [] if verify else ["--no-verify"]
    probe(["info", ckpt, *tail])
    probe(["eval", ckpt, "--data", text_file, "--seqlen", "32", "--quiet", *tail])


def test_info_on_a_path_that_does_not_exist(tmp_path, probe):
    assert "does not exist" in probe(["info", tmp_path / "nonexistent"]).lines[0]


def test_quantizing_a_quantized_checkpoint_says_so(mini_checkpoint, tmp_path, probe):
    out = tmp_path / "out"
    assert "already quantized" in probe(_quantize(mini_checkpoint, out), outputs=(out,)).lines[0]


def test_text_that_is_not_utf8_is_named(mini_llama_dir, tmp_path, probe):
    data = tmp_path / "latin1.txt"
    data.write_bytes("café crème brûlée ".encode("latin-1") * 200)
    assert str(data) in probe(["eval", mini_llama_dir, "--data", data, "--quiet"]).lines[0]


def test_eval_seqlen_beyond_the_context(mini_llama_dir, text_file, probe):
    o = probe(["eval", mini_llama_dir, "--data", text_file, "--seqlen", "129", "--quiet"])
    assert "context of 128" in o.lines[0]


def test_an_argparse_mistake_is_one_line_with_a_compact_usage(probe):
    o = probe(["quantize", "--bits", "four"])
    assert "invalid int value: 'four'" in o.lines[0] and "usage: lowbit quantize MODEL -o OUTPUT" in o.lines[0]


def test_eval_json_is_strict_json_even_for_an_infinite_perplexity(mini_llama_dir, text_file, probe, monkeypatch):
    """A perplexity that overflows is reported as null, not as the invalid token Infinity."""
    from lowbit.evaluate import perplexity

    real = perplexity.evaluate_windows

    def overflowing(*args, **kwargs):
        return dataclasses.replace(real(*args, **kwargs), ppl=float("inf"))

    monkeypatch.setattr(perplexity, "evaluate_windows", overflowing)
    o = probe.run(["eval", str(mini_llama_dir), "--data", str(text_file), "--seqlen", "32", "--max-windows", "1",
                   "--json", "--quiet"])
    assert o.rc == 0 and json.loads(o.out)["ppl"] is None


# ---- schemes and recipes: validated at construction, types included ----

@pytest.mark.parametrize("fields,field", [
    ({"bits": 4.5}, "bits"), ({"bits": "four"}, "bits"), ({"bits": True}, "bits"), ({"group_size": 64.0}, "group_size"),
    ({"group_size": "64"}, "group_size"), ({"symmetric": "no"}, "symmetric"), ({"double_quant": 1}, "double_quant"),
    ({"observer": 3}, "observer"), ({"format": 4}, "format"), ({"format": ["int"]}, "format"),
    ({"granularity": None}, "granularity"), ({"vector_dim": 2.0, "format": "vq"}, "vector_dim"),
    ({"symmetric": True, "zero_point": "float"}, "zero"), ({"bits": 0}, "bits"), ({"bits": 64}, "bits"),
    ({"group_size": 0}, "group size"), ({"format": "nf4", "bits": 3}, "nf4"),
])
def test_a_scheme_is_checked_at_construction(fields, field, refusal):
    error = refusal(QuantScheme, **fields)
    assert error is not None and field in str(error)


@pytest.mark.parametrize("default", ["{bits: 4.5}", "{group_size: 64.0}", '{bits: "four"}', "{symmetric: maybe}",
                                     "[4]", "{format: nf4, zero_point: float}"])
def test_recipe_values_of_the_wrong_type(default, mini_llama_dir, tmp_path, probe):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"method: rtn\ndefault: {default}\n")
    out = tmp_path / "out"
    probe(_quantize(mini_llama_dir, out, "--recipe", recipe), outputs=(out,))

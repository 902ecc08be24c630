"""CLI smoke tests on the tiny model: the contract other issues extend."""

import json

import pytest

from lowbit.cli import main

TEXT = "The tower is 324 metres tall, about the same height as an 81-storey building. " * 60


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "eval.txt"
    path.write_text(TEXT)
    return path


def test_quantize_info_eval(tiny_llama_dir, tmp_path, text_file, capsys):
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_llama_dir), "-o", str(out), "--bits", "3", "--group-size", "32", "--asym",
                 "--quiet"]) == 0
    assert "int3 g32 asym" in capsys.readouterr().out
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["bpw"] == 3 + 16 / 32 + 3 / 32 and info["quantized_layers"] == 14
    assert main(["eval", str(out), "--data", str(text_file), "--seqlen", "64", "--max-windows", "3",
                 "--reference", str(tiny_llama_dir), "--json", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("ppl", "nll", "tokens", "windows", "seqlen", "kld", "top1", "bpw", "size_bytes"):
        assert key in result
    assert result["windows"] == 3 and result["tokens"] == 3 * 63 and result["kld"] > 0


def test_recipe_file_and_flags_override_it(tiny_llama_dir, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: rtn\ndefault: {format: nf4, bits: 4, group_size: 64, double_quant: true}\n"
                      "overrides:\n  - {pattern: down_proj, scheme: null}\n")
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_llama_dir), "-o", str(out), "--recipe", str(recipe), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["quantized_layers"] == 12 and {r["scheme"] for r in info["layers"]} == {"nf4 g64 dq"}


@pytest.mark.parametrize("args,message", [
    (["quantize", "no/such/dir/x", "-o", "{tmp}/o"], "model not found"),
    (["quantize", "{model}", "-o", "{tmp}/o", "--format", "nf4", "--bits", "3"], "nf4 is a 4-bit format"),
    (["quantize", "{model}", "-o", "{tmp}/o", "--group-size", "100"], "group size 100 does not divide"),
    (["quantize", "{model}", "-o", "{tmp}/o", "--method", "gptq", "--calib-samples", "2", "--calib-seqlen", "8"],
     "calibration has 16 tokens, fewer than the 512 inputs"),
    (["quantize", "{model}", "-o", "{tmp}"], "already exists"),
    (["eval", "{model}", "--data", "{tmp}/missing.txt"], "not found"),
    (["eval", "{model}", "--data", "{empty}"], "empty"),
    (["info", "{model}"], "not a lowbit checkpoint"),
    (["pull", "llama-70b"], "unknown demo model"),
    (["quantize", "{model}", "-o", "{tmp}/o", "--acts", "int8", "--rotate", "--gguf", "{tmp}/o.gguf"],
     "gguf cannot write a model with an online Hadamard rotation"),
    (["quantize", "{model}", "-o", "{tmp}/o", "--acts", "int8", "--act-outlier-ratio", "8"],
     "--act-outlier-ratio applies to static scales"),
    (["quantize", "{model}", "-o", "{tmp}/o", "--damp", "0.1"], "--damp sets gptq's damp, but the recipe runs rtn"),
    (["quantize", "{model}", "-o", "{tmp}/o", "--method", "gptq", "--transform", "awq", "--rotate"],
     "hadamard does not compose with 'awq'"),
    (["quantize", "{model}", "-o", "{tmp}/o", "--method", "squeezellm", "--outlier-fraction", "0.2"],
     "--outlier-fraction: 0.2 is not in [0, 0.1]"),
    (["quantize", "{model}", "-o", "{tmp}/o", "--method", "squeezellm", "--bits", "9"],
     "lut codebooks take 1 to 8 bits per code"),
    (["quantize", "{model}", "-o", "{tmp}/o", "--format", "lut"], "rtn cannot fill them"),
    (["quantize", "{model}", "-o", "{tmp}/o", "--format", "ternary", "--asym"], "ternary codes are symmetric"),
    (["quantize", "{model}", "-o", "{tmp}/o", "--outlier-fraction", "0.01"], "--outlier-fraction sets squeezellm's"),
    (["quantize", "{model}", "-o", "{tmp}/o", "--method", "gptq", "--calib-samples", "4", "--calib-generated", "5"],
     "--calib-generated must be between 0 and --calib-samples (4), got 5"),
    (["quantize", "{model}", "-o", "{tmp}/o", "--method", "gptq", "--calib-generated", "2", "--work-dir", "{tmp}/w"],
     "--calib-generated samples from the whole float model"),
])
def test_bad_input_is_one_line_and_exit_2(tiny_llama_dir, tmp_path, capsys, args, message):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    argv = [a.format(tmp=tmp_path, model=tiny_llama_dir, empty=empty) for a in args] + ["--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_gptq_from_the_command_line(tiny_llama_dir, tmp_path, text_file, capsys):
    out = tmp_path / "g"
    assert main(["quantize", str(tiny_llama_dir), "-o", str(out), "--method", "gptq", "--bits", "4", "--group-size",
                 "64", "--calib", str(text_file), "--calib-samples", "12", "--calib-seqlen", "64", "--quiet"]) == 0
    assert "(gptq)" in capsys.readouterr().out
    assert main(["info", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["method"] == "gptq"
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["calibration"]["samples"] == 12 and qc["calibration"]["seed"] == 0


def test_gptq_on_windows_half_generated_by_the_model(tiny_llama_dir, tmp_path, text_file, capsys):
    out = tmp_path / "g"
    assert main(["quantize", str(tiny_llama_dir), "-o", str(out), "--method", "gptq", "--bits", "4", "--group-size",
                 "64", "--calib", str(text_file), "--calib-samples", "8", "--calib-generated", "4", "--calib-seqlen",
                 "64", "--quiet"]) == 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["calibration"]["samples"] == 8 and qc["calibration"]["generated"] == 4


def test_squeezellm_from_the_command_line_and_info_shows_tables_and_outliers(tiny_llama_dir, tmp_path, text_file,
                                                                          capsys):
    out = tmp_path / "s"
    assert main(["quantize", str(tiny_llama_dir), "-o", str(out), "--method", "squeezellm", "--bits", "3",
                 "--outlier-fraction", "0.01", "--fisher-samples", "4", "--calib", str(text_file),
                 "--calib-samples", "12", "--calib-seqlen", "64", "--quiet"]) == 0
    assert "(squeezellm)" in capsys.readouterr().out
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    layer = next(r for r in info["layers"] if r["name"] == "model.layers.0.mlp.down_proj")  # [256, 512]
    assert layer["scheme"] == "lut3 per-channel +sparse" and layer["codebook_shape"] == [256, 8]
    assert layer["outliers"] == round(0.01 * 256 * 512) and layer["codebook_bpw"] == 8 * 16 / 512
    assert layer["bpw"] == 3 + layer["codebook_bpw"] + layer["outlier_bpw"]
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "codebook 256x8 f16 (0.250 bpw)" in text and "outliers 1,311 (0.480 bpw)" in text


def test_awq_with_group_fallback_from_the_command_line(tiny_llama_dir, tmp_path, text_file, capsys):
    out = tmp_path / "a"
    assert main(["quantize", str(tiny_llama_dir), "-o", str(out), "--method", "awq+gptq", "--bits", "3",
                 "--group-size", "512", "--group-fallback", "channel", "--asym", "--calib", str(text_file),
                 "--calib-samples", "12", "--calib-seqlen", "64", "--quiet"]) == 0
    assert "(awq+gptq)" in capsys.readouterr().out
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["method"] == "awq+gptq"
    assert {r["scheme"] for r in info["layers"]} == {"int3 g512 asym", "int3 per-channel asym"}  # 512 divides 512, not 256


def test_smoothquant_static_w8a8_from_the_command_line(tiny_llama_dir, tmp_path, text_file, capsys):
    out = tmp_path / "w8a8"
    assert main(["quantize", str(tiny_llama_dir), "-o", str(out), "--method", "smoothquant", "--acts", "int8",
                 "--act-mode", "static", "--act-observer", "percentile", "--calib", str(text_file),
                 "--calib-samples", "4", "--calib-seqlen", "64", "--quiet"]) == 0
    assert "int8 per-channel, activations int8 static (percentile 99.99) (smoothquant)" in capsys.readouterr().out
    assert main(["info", str(out)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "q_proj" in line]
    assert len(lines) == 2 and all("act int8 static (percentile 99.99) scale " in line for line in lines)
    assert main(["eval", str(out), "--data", str(text_file), "--seqlen", "64", "--max-windows", "2", "--json",
                 "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["ppl"] > 1


def test_finetune_from_the_command_line(tiny_llama_dir, tmp_path, text_file, capsys):
    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    assert main(["finetune", str(tiny_llama_dir), "--data", str(text_file), "-o", str(adapter), "--steps", "3",
                 "--seqlen", "32", "--batch-size", "2", "--lora-r", "4", "--target", "q_proj,down_proj",
                 "--eval-windows", "1", "--merge", str(merged), "--json", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["steps"] == 3 and len(report["losses"]) == 3 and report["heldout_ppl_after"] > 1
    assert (adapter / "adapter_model.safetensors").is_file() and (merged / "model.safetensors").is_file()
    assert main(["finetune", str(tiny_llama_dir), "--data", str(text_file), "-o", str(adapter), "--steps", "1",
                 "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err
    # an adapter is lowbit's, so --overwrite replaces it (resuming from it), leaving nothing beside it
    assert main(["finetune", str(tiny_llama_dir), "--data", str(text_file), "-o", str(adapter), "--resume",
                 str(adapter), "--steps", "1", "--seqlen", "32", "--batch-size", "2", "--eval-windows", "0",
                 "--overwrite", "--quiet"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "merged"]


def test_rotated_static_w8a8_from_the_command_line(tiny_llama_dir, tmp_path, text_file, capsys):
    out = tmp_path / "rot"
    assert main(["quantize", str(tiny_llama_dir), "-o", str(out), "--rotate", "--acts", "int8", "--act-mode", "static",
                 "--act-observer", "mse", "--act-outlier-ratio", "1000", "--calib", str(text_file),
                 "--calib-samples", "4", "--calib-seqlen", "64", "--quiet"]) == 0
    assert "activations int8 static (mse, dynamic above 1000x) (hadamard+rtn)" in capsys.readouterr().out
    assert main(["info", str(out)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "proj" in line]
    assert [("input rotated" in line) for line in lines] == [("down_proj" in line) for line in lines]
    recipe = json.loads((out / "config.json").read_text())["quantization_config"]["recipe"]
    assert [t["name"] for t in recipe["transforms"]] == ["hadamard"]
    assert main(["eval", str(out), "--data", str(text_file), "--seqlen", "64", "--max-windows", "2", "--json",
                 "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["ppl"] > 1


def test_method_and_transforms_from_the_tables():
    """``--transform`` composes what a ``--method`` shorthand names; knob flags reach the configs."""
    from lowbit.cli import build_parser, recipe_from_args

    def recipe(*flags):
        return recipe_from_args(build_parser().parse_args(["quantize", "m", "-o", "o", *flags]))

    assert recipe("--method", "smoothquant+gptq") == recipe("--method", "gptq", "--transform", "smoothquant")
    r = recipe("--method", "smoothquant+gptq", "--damp", "0.05", "--no-act-order", "--smoothquant-alpha", "0.8")
    assert (r.method_config.damp, r.method_config.act_order, r.transforms[0].config.alpha) == (0.05, False, 0.8)
    assert [t.name for t in recipe("--method", "gptq", "--rotate").transforms] == ["hadamard"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["quantize", "m", "-o", "o", "--method", "awq+gptq+rtn"])


def test_format_ternary_defaults_to_its_two_bit_codes():
    """``--format ternary`` (the trainer's BitNet b1.58 target) needs no ``--bits``; the scheme is 2-bit."""
    from lowbit.cli import build_parser, recipe_from_args

    args = build_parser().parse_args(["quantize", "m", "-o", "o", "--format", "ternary", "--group-size", "64"])
    assert recipe_from_args(args).default.describe() == "ternary g64"

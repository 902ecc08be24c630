"""Fault probes over the command line, run in-process (issue 16, part 5): every option of every
command given a wrong type or value, every file lowbit reads truncated and bit-flipped, and the
cases the issue lists. Each goes through ``probe`` (conftest), which checks the exit status, the
single line, the absence of a traceback and what is left at the output names."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest

from lowbit.cli import build_parser
from lowbit.cli_numbers import FloatRange

# What every call of a command must give, so a probe's mistake is the only one; {out} is where a
# writing command writes, the rest are fixtures. Sizes keep a run that gets through to work short.
BASE = {
    "pull": ["pull", "smollm2-135m"],  # only argument errors are probed: they come before the download
    "quantize": ["quantize", "{model}", "-o", "{out}"],
    "eval": ["eval", "{model}", "--data", "{text}", "--seqlen", "32", "--max-windows", "1"],
    "export": ["export", "{model}", "--to", "gguf", "-o", "{out}", "--type", "Q8_0"],
    "export-gguf": ["export-gguf", "{model}", "-o", "{out}", "--type", "Q8_0"],
    "finetune": ["finetune", "{model}", "--data", "{text}", "-o", "{out}", "--steps", "2", "--seqlen", "16",
                 "--batch-size", "1", "--eval-windows", "0", "--quant", "none"],
    "train": ["train", "{ckpt}", "--teacher", "{model}", "-o", "{out}", "--data", "{text}", "--seqlen", "16",
              "--samples", "2", "--heldout", "1", "--steps", "1", "--block-epochs", "1", "--topk", "4"],
    "info": ["info", "{ckpt}"],
    "generate": ["generate", "{model}", "--prompt", "hi", "--max-new-tokens", "2"],
    "bench-speed": ["bench-speed", "{model}", "--prompt-tokens", "4", "--new-tokens", "2", "--repeats", "1"],
    "pareto": ["pareto", "{model}", "--budgets", "3,4", "-o", "{out}", "--windows", "1", "--data", "{text}",
               "--calib", "{text}", "--calib-samples", "1", "--calib-seqlen", "32"],
}
WRITES = {"quantize", "export", "export-gguf", "finetune", "train", "pareto"}


def _option_cases() -> list[tuple[str, list[str]]]:
    """(command, extra arguments) for every option of every command: a switch given a value, a
    choice outside its choices, a number that is not one, a float that is not finite, a value left out."""
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    cases = []
    for command, parser in sub.choices.items():
        for action in parser._actions:
            if not action.option_strings or action.option_strings[0] == "-h":
                continue
            flag = action.option_strings[-1]
            if action.nargs == 0:
                cases.append((command, [f"{flag}=x"]))
                continue
            if action.choices:
                cases.append((command, [flag, "bogus"]))
            if action.type is int or isinstance(action.type, FloatRange):
                cases.append((command, [flag, "x"]))
            if isinstance(action.type, FloatRange):  # every float option: parsed by float(), refused as not finite
                cases += [(command, [flag, value]) for value in ("nan", "inf", "-inf", "NaN", "1e999")]
            cases.append((command, [flag]))  # last on the line: its value is missing
    return cases


# Values of the right type that no run can use: each must be refused with one line, before any output.
WRONG_VALUES = [
    ("quantize", ["--bits", "0"]), ("quantize", ["--bits", "99"]), ("quantize", ["--group-size", "0"]),
    ("quantize", ["--group-size", "-32"]), ("quantize", ["--group-size", "100"]),
    ("quantize", ["--method", "gptq", "--calib", "{text}", "--calib-samples", "0"]),
    ("quantize", ["--method", "gptq", "--calib", "{text}", "--calib-seqlen", "0"]),
    ("quantize", ["--method", "gptq", "--calib", "{text}", "--calib-seqlen", "100000"]),
    ("quantize", ["--method", "gptq", "--calib", "{tmp}/none.txt"]),
    ("quantize", ["--method", "gptq", "--calib", "{text}", "--damp", "-1"]),
    ("quantize", ["--acts", "int8", "--act-mode", "static", "--act-percentile", "200", "--calib", "{text}"]),
    ("quantize", ["--method", "smoothquant", "--smoothquant-alpha", "2", "--calib", "{text}"]),
    ("quantize", ["--skip", "["]), ("quantize", ["--recipe", "{tmp}/none.yaml"]),
    ("quantize", ["--gguf", "/proc/lowbit-probe.gguf"]), ("quantize", ["--gguf", "{out}.gguf", "--gguf-type", "BOGUS"]),
    ("quantize", ["--sym", "--zero-point", "float"]), ("quantize", ["--format", "nf4", "--zero-point", "int"]),
    ("quantize", ["--format", "nf4", "--asym"]), ("quantize", ["--format", "fp8_e4m3", "--bits", "4"]),
    ("quantize", ["--damp", "0.1"]), ("quantize", ["--acts", "int8", "--act-outlier-ratio", "8"]),
    ("eval", ["--seqlen", "0"]), ("eval", ["--seqlen", "100000"]), ("eval", ["--max-windows", "0"]),
    ("eval", ["--data", "{tmp}/none.txt"]), ("eval", ["--reference", "{tmp}/none"]),
    ("eval", ["--runtime", "llama.cpp"]),
    ("export", ["--type", "BOGUS"]), ("export-gguf", ["--type", "BOGUS"]), ("export", ["--to", "lowbit"]),
    ("finetune", ["--lora-r", "0"]), ("finetune", ["--lora-alpha", "0"]), ("finetune", ["--steps", "0"]), ("finetune", ["--batch-size", "0"]),
    ("finetune", ["--seqlen", "0"]), ("finetune", ["--holdout", "1.5"]), ("finetune", ["--lora-dropout", "2"]),
    ("finetune", ["--lr", "-1"]), ("finetune", ["--quant", "nf4", "--block-size", "0"]),
    ("finetune", ["--target", "nope"]), ("finetune", ["--resume", "{tmp}/none"]),
    ("finetune", ["--merge", "/proc/lowbit-probe"]), ("finetune", ["--warmup", "-1"]),
    ("finetune", ["--eval-windows", "-1"]), ("finetune", ["--data", "{tmp}/none.txt"]),
    ("generate", ["--max-new-tokens", "-1"]), ("generate", ["--temperature", "-1"]), ("generate", ["--threads", "0"]),
    ("bench-speed", ["--prompt-tokens", "0"]), ("bench-speed", ["--new-tokens", "0"]),
    ("bench-speed", ["--repeats", "0"]), ("bench-speed", ["--threads", "0"]),
    ("bench-speed", ["--prompt-tokens", "100000"]),
    ("train", ["--steps", "0"]), ("train", ["--samples", "0"]), ("train", ["--block-seqlen", "5"]),
    ("train", ["--stage", "warmup"]), ("train", ["--data", "{tmp}/none.txt"]), ("train", ["--resume"]),
    ("train", ["--teacher", "{tmp}/none"]), ("train", ["--samples", "100000"]),
    ("quantize", ["--target-size", "90XB", "--calib", "{text}"]), ("quantize", ["--target-bpw", "1", "--calib", "{text}"]),
    ("export-gguf", ["--target-size", "1KB", "--calib", "{text}"]), ("export", ["--to", "lowbit", "--target-size", "Q4_K_M"]),
    ("pareto", ["--budgets", "x"]), ("pareto", ["--budgets", "0.5"]), ("pareto", ["--windows", "0"]),
    ("pareto", ["--peers", "{tmp}/none.json"]),
]


def _argv(command: str, extra: list[str], paths: dict[str, Path]) -> list[str]:
    return [a.format(**paths) for a in [*BASE[command], "--quiet", *extra]]


@pytest.fixture
def paths(mini_llama_dir, mini_checkpoint, text_file, tmp_path) -> dict[str, Path]:
    return {"model": mini_llama_dir, "ckpt": mini_checkpoint, "text": text_file, "tmp": tmp_path,
            "out": tmp_path / "out"}


@pytest.mark.parametrize("command,extra", _option_cases(), ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_every_option_given_a_wrong_type(command, extra, paths, probe):
    probe(_argv(command, extra, paths), outputs=(paths["out"],) if command in WRITES else ())


@pytest.mark.parametrize("command,extra", WRONG_VALUES, ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_every_option_given_a_value_no_run_can_use(command, extra, paths, probe):
    o = probe(_argv(command, extra, paths), outputs=(paths["out"],) if command in WRITES else ())
    assert o.lines[0].startswith(f"lowbit {command}")


# ---- every file lowbit reads, truncated and bit-flipped ----

def _mutations(size: int) -> list[tuple[str, int]]:
    """(kind, offset) pairs spread over a file of ``size`` bytes: its start, its header, its middle, its end."""
    offsets = sorted({0, 1, 8, 9, 64, size // 3, size // 2, size - 1} & set(range(size)))
    return [("truncate", o) for o in offsets] + [("flip", o) for o in offsets]


def _mutate(path: Path, kind: str, offset: int) -> None:
    data = bytearray(path.read_bytes())
    if kind == "truncate":
        del data[offset:]
    else:
        data[offset] ^= 0x40  # bit 6: turns digits, letters and JSON punctuation into other characters
    path.write_bytes(bytes(data))


def _pick(path: Path, index: int) -> tuple[str, int]:
    cases = _mutations(path.stat().st_size)
    return cases[index % len(cases)]


@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
@pytest.mark.parametrize("index", range(16))
@pytest.mark.parametrize("command", ["info", "eval", "export-gguf"])
def test_a_corrupt_checkpoint_is_refused(name, index, command, mini_checkpoint, text_file, tmp_path, probe):
    """The manifest covers both files, so every change is refused, whichever command reads them."""
    ckpt = Path(shutil.copytree(mini_checkpoint, tmp_path / "ckpt"))
    kind, offset = _pick(ckpt / name, index)
    same = name == "config.json" and kind == "truncate" and offset == (ckpt / name).stat().st_size - 1
    _mutate(ckpt / name, kind, offset)  # ``same``: only the final newline goes, the JSON is unchanged
    out = tmp_path / "out.gguf"
    argv = {"info": ["info", ckpt],
            "eval": ["eval", ckpt, "--data", text_file, "--seqlen", "32", "--max-windows", "1", "--quiet"],
            "export-gguf": ["export-gguf", ckpt, "-o", out, "--quiet"]}[command]
    probe(argv, expect={0, 2} if same else 2, outputs=() if same else (out,))


@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
@pytest.mark.parametrize("index", range(16))
def test_a_corrupt_checkpoint_read_without_verifying(name, index, mini_checkpoint, text_file, tmp_path, probe):
    """With --no-verify a changed file may still be a valid checkpoint (exit 0, strict JSON out);
    otherwise it is one line."""
    ckpt = Path(shutil.copytree(mini_checkpoint, tmp_path / "ckpt"))
    _mutate(ckpt / name, *_pick(ckpt / name, index))
    probe(["eval", ckpt, "--data", text_file, "--seqlen", "32", "--max-windows", "1", "--json", "--quiet",
           "--no-verify"], expect={0, 2})


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "tokenizer.json"])
@pytest.mark.parametrize("index", range(16))
def test_a_corrupt_source_model(name, index, mini_llama_dir, tmp_path, probe):
    """A float model has no manifest: a flipped bit may leave a valid model (exit 0, and the output
    verifies); a truncated file, one that no longer parses or holds NaN is one line, no output."""
    src = Path(shutil.copytree(mini_llama_dir, tmp_path / "src"))
    kind, offset = _pick(src / name, index)
    size = (src / name).stat().st_size
    _mutate(src / name, kind, offset)
    out = tmp_path / "out"
    structural = kind == "truncate" and name != "tokenizer.json" and offset < size - 1
    probe(["quantize", src, "-o", out, "--group-size", "32", "--quiet"], expect=2 if structural else {0, 2},
          outputs=(out,))


@pytest.mark.parametrize("index", range(16))
def test_a_corrupt_recipe(index, mini_llama_dir, tmp_path, probe):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: rtn\ndefault: {format: int, bits: 4, granularity: group, group_size: 32, "
                      "symmetric: false}\noverrides:\n  - {pattern: down_proj, scheme: {format: nf4, bits: 4, "
                      "group_size: 32}}\nskip: [lm_head]\n")
    _mutate(recipe, *_pick(recipe, index))
    out = tmp_path / "out"
    probe(["quantize", mini_llama_dir, "-o", out, "--recipe", recipe, "--quiet"], expect={0, 2}, outputs=(out,))


@pytest.mark.parametrize("index", range(16))
def test_a_corrupt_gguf(index, mini_gguf, text_file, tmp_path, probe):
    gguf = tmp_path / "m.gguf"
    shutil.copy(mini_gguf, gguf)
    kind, offset = _pick(gguf, index)
    _mutate(gguf, kind, offset)
    probe(["eval", gguf, "--data", text_file, "--seqlen", "32", "--max-windows", "1", "--json", "--quiet"],
          expect=2 if kind == "truncate" else {0, 2})


@pytest.mark.parametrize("index", range(16))
def test_a_corrupt_text(index, mini_llama_dir, text_file, tmp_path, probe):
    text = tmp_path / "t.txt"
    shutil.copy(text_file, text)
    kind, offset = _pick(text, index)
    _mutate(text, kind, offset)
    probe(["eval", mini_llama_dir, "--data", text, "--seqlen", "32", "--max-windows", "1", "--json", "--quiet"],
          expect=2 if kind == "truncate" and offset < 9 else {0, 2})  # a few characters: not one window

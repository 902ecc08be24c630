"""No pickle unless asked (``lowbit.io.pickles``): a model or adapter directory whose weights are only a pickle
file is refused with one line naming it and the safetensors alternative, exit 2 from the CLI, and read with
``--allow-pickle``. The CLI runs in-process through ``main``."""

from __future__ import annotations

import shutil

import pytest
import torch

from lowbit.cli import main
from lowbit.io.pickles import check_no_pickle

TEXT = "The quick brown fox jumps over the lazy dog. " * 200


@pytest.fixture(scope="module")
def pickle_dir(tiny_llama_dir, tmp_path_factory):
    """The tiny Llama with its weights as ``pytorch_model.bin`` (torch.save) instead of safetensors."""
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("pickled") / "m"
    shutil.copytree(tiny_llama_dir, out, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(AutoModelForCausalLM.from_pretrained(tiny_llama_dir).state_dict(), out / "pytorch_model.bin")
    return out


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "t.txt"
    path.write_text(TEXT)
    return path


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


def test_a_safetensors_directory_passes_and_a_pickle_one_does_not(tiny_llama_dir, pickle_dir):
    check_no_pickle(tiny_llama_dir, allow_pickle=False)
    check_no_pickle(pickle_dir, allow_pickle=True)
    with pytest.raises(ValueError, match=r"pytorch_model.bin is a pickle file.*safetensors.*--allow-pickle"):
        check_no_pickle(pickle_dir, allow_pickle=False)


@pytest.mark.parametrize("command", [
    ["quantize", "{model}", "-o", "{tmp}/o"],
    ["eval", "{model}", "--data", "{text}", "--seqlen", "32", "--max-windows", "1"],
    ["eval", "{safe}", "--reference", "{model}", "--data", "{text}", "--seqlen", "32", "--max-windows", "1"],
    ["export", "{model}", "--to", "gguf", "-o", "{tmp}/o"],
    ["finetune", "{model}", "--data", "{text}", "-o", "{tmp}/o", "--steps", "1"],
    ["finetune", "{model}", "--quant", "none", "--data", "{text}", "-o", "{tmp}/o", "--steps", "1"],
    ["generate", "{model}", "--prompt", "hi", "--max-new-tokens", "1"],
], ids=lambda c: "-".join(c[:2]) + ("-reference" if "--reference" in c else "") + ("-float" if "none" in c else ""))
def test_a_pickle_only_model_is_one_line_and_exit_2(command, pickle_dir, tiny_llama_dir, text_file, tmp_path, capsys):
    argv = [a.format(model=pickle_dir, safe=tiny_llama_dir, text=text_file, tmp=tmp_path) for a in command]
    assert main([*argv, "--quiet"]) == 2
    err = _one_line_error(capsys)
    assert "pytorch_model.bin is a pickle file" in err and "--allow-pickle" in err
    assert not (tmp_path / "o").exists()


def test_allow_pickle_reads_it(pickle_dir, tiny_llama_dir, tmp_path, capsys):
    assert main(["quantize", str(pickle_dir), "-o", str(tmp_path / "a"), "--allow-pickle", "--quiet"]) == 0
    assert main(["quantize", str(tiny_llama_dir), "-o", str(tmp_path / "b"), "--quiet"]) == 0
    capsys.readouterr()
    # the same weights either way: byte-identical checkpoints
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_finetune_resume_refuses_a_pickle_adapter_unless_allowed(tiny_llama_dir, text_file, tmp_path, capsys):
    from safetensors.torch import load_file

    adapter = tmp_path / "adapter"
    common = ["--data", str(text_file), "--steps", "1", "--seqlen", "32", "--batch-size", "1", "--lora-r", "2",
              "--target", "q_proj", "--eval-windows", "0", "--quiet"]
    assert main(["finetune", str(tiny_llama_dir), "-o", str(adapter), *common]) == 0
    weights = adapter / "adapter_model.safetensors"
    torch.save(load_file(weights), adapter / "adapter_model.bin")
    weights.unlink()
    resume = ["finetune", str(tiny_llama_dir), "-o", str(tmp_path / "again"), "--resume", str(adapter), *common]
    assert main(resume) == 2
    assert "adapter_model.bin is a pickle file" in _one_line_error(capsys)
    assert main([*resume, "--allow-pickle"]) == 0

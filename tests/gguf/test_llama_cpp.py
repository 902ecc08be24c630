"""llama.cpp as the GGUF oracle: it scores the demo GGUF like lowbit scores the same model.

The real-model test needs the optional llama-cpp-python (``pip install 'lowbit[llama-cpp]'``) and
the pulled SmolLM2-135M (``lowbit pull smollm2-135m``); it is skipped, with the reason, without
either. The checks of the wrapper's own arguments run everywhere.
"""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from lowbit.evaluate.text import default_eval_path, read_text, token_windows
from lowbit.gguf.llama_cpp import (
    llama_cpp_generate,
    llama_cpp_logits,
    llama_cpp_version,
)
from lowbit.sources import lowbit_home, needs_bos

HAVE_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
needs_llama_cpp = pytest.mark.skipif(
    not HAVE_LLAMA_CPP, reason="llama-cpp-python is not installed (pip install 'lowbit[llama-cpp]')"
)


def _demo_gguf():
    files = sorted((lowbit_home() / "models" / "smollm2-135m" / "gguf").glob("*.gguf"))
    if not files:
        pytest.skip("SmolLM2-135M is not pulled (lowbit pull smollm2-135m)")
    return files[0]


def _llama_cpp_ppl(path, inputs: list[list[int]]) -> float:
    """exp(mean NLL) of each input's tokens 1.. given the ones before, from llama.cpp's logits."""
    nll, count = 0.0, 0
    for ids, logits in zip(inputs, llama_cpp_logits(path, inputs, n_threads=1)):
        logp = torch.log_softmax(torch.from_numpy(logits[:-1]).double(), dim=-1)
        nll -= logp.gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).sum().item()
        count += len(ids) - 1
    return float(torch.tensor(nll / count).exp())


@pytest.mark.real_model
@needs_llama_cpp
def test_llama_cpp_perplexity_matches_lowbit():
    from lowbit.api import load
    from lowbit.evaluate.perplexity import evaluate_windows

    path = _demo_gguf()
    model, tokenizer = load("smollm2-135m")
    windows = token_windows(read_text(default_eval_path()), tokenizer, 128, 2)
    bos_id = tokenizer.bos_token_id if needs_bos(tokenizer) else None
    inputs = [([bos_id] if bos_id is not None else []) + w.tolist() for w in windows]

    logits = next(llama_cpp_logits(path, inputs[:1], n_threads=1))
    assert logits.dtype.name == "float32" and logits.shape == (len(inputs[0]), model.config.vocab_size)

    ours = evaluate_windows(model, windows, bos_id=bos_id, progress=False).ppl
    # The HF weights are the GGUF's Q4_1 dequantized to float32, but llama.cpp multiplies Q4_1 by
    # Q8_1-quantized activations: measured ppl 39.61 vs 39.45 (+0.41%; +0.67% on 4 x 512). An F32
    # GGUF of the same weights matches to 0.01%; a misaligned or wrong logit is off by far more.
    assert _llama_cpp_ppl(path, inputs) == pytest.approx(ours, rel=0.01)


@pytest.mark.real_model
@needs_llama_cpp
def test_llama_cpp_greedy_generation_is_text():
    path = _demo_gguf()
    text = llama_cpp_generate(path, "The capital of France is", max_tokens=8, n_threads=1)
    assert text.strip()
    assert llama_cpp_generate(path, "The capital of France is", max_tokens=8, n_threads=1) == text
    assert llama_cpp_version()


def test_missing_file_and_bad_arguments_raise(tmp_path):
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        llama_cpp_logits(tmp_path / "none.gguf", [[1, 2]])
    (tmp_path / "m.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match="windows is empty"):
        llama_cpp_logits(tmp_path / "m.gguf", [])
    with pytest.raises(ValueError, match="empty window"):
        llama_cpp_logits(tmp_path / "m.gguf", [[1], []])
    with pytest.raises(ValueError, match="n_threads"):
        llama_cpp_logits(tmp_path / "m.gguf", [[1]], n_threads=0)
    with pytest.raises(ValueError, match="max_tokens"):
        llama_cpp_generate(tmp_path / "m.gguf", "hi", 0)


def test_missing_llama_cpp_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # makes `import llama_cpp` raise ImportError
    (tmp_path / "m.gguf").write_bytes(b"")
    with pytest.raises(ImportError, match=r"lowbit\[llama-cpp\]"):
        llama_cpp_version()
    with pytest.raises(ImportError, match=r"lowbit\[llama-cpp\]"):
        llama_cpp_logits(tmp_path / "m.gguf", [[1]])


@needs_llama_cpp
def test_llama_cpp_scores_an_exported_file_like_lowbit(tiny_llama_dir, tmp_path, capsys):
    """The issue's contract: llama.cpp's perplexity of a file lowbit wrote equals lowbit's own
    evaluation of the same weights (F32: only float summation order differs)."""
    import json

    from lowbit.api import load
    from lowbit.cli import main
    from lowbit.evaluate.perplexity import evaluate_windows
    from lowbit.gguf.export import export_gguf
    from lowbit.gguf.llama_cpp import LlamaCppModel

    model, tokenizer = load(str(tiny_llama_dir))
    export_gguf(model, tokenizer, tmp_path / "tiny.gguf", "F32")
    windows = torch.randint(3, 500, (3, 64), generator=torch.Generator().manual_seed(0))
    ours = evaluate_windows(model, windows, bos_id=None, progress=False)
    runner = LlamaCppModel(tmp_path / "tiny.gguf", n_ctx=64)
    theirs = evaluate_windows(runner, windows, bos_id=None, reference=model, progress=False)
    runner.close()
    assert theirs.ppl == pytest.approx(ours.ppl, rel=0.005) and theirs.kld < 1e-4

    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 100)
    assert main(["eval", str(tmp_path / "tiny.gguf"), "--runtime", "llama.cpp", "--data", str(text),
                 "--seqlen", "32", "--max-windows", "2", "--json", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["runtime"].startswith("llama.cpp") and out["windows"] == 2 and out["ppl"] > 1

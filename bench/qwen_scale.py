"""Qwen2.5-Coder-1.5B outputs of the memory-limit jobs: KL against the float model, and llama.cpp
against lowbit on the same GGUF weights.

    python bench/qwen_scale.py kl --checkpoint OUT [--gguf FILE.gguf ...] [--windows 16]
    python bench/qwen_scale.py llama-cpp FILE.gguf [--chunks 4]

``kl``: WikiText-2 raw test, the first N windows of 512 tokens (the README protocol: 16 for the
larger models), each model beside the float one in one pass (``evaluate_models``: the float logits
are computed once): lowbit checkpoints through lowbit's kernels with float32 activations, GGUF
files through llama.cpp itself (llama-cpp-python, 1 thread).

``llama-cpp``: the file must load in llama.cpp's own tools and score like lowbit's reading of it.
(1) token ids of llama.cpp's tokenizer (from the file's metadata) against transformers' tokenizer of
the float source, on llama.cpp's pre-tokenizer probe text and 20,000 characters of WikiText-2;
(2) ``llama-perplexity -c 512 --chunks N -t 1`` on wiki.test.raw against the same protocol computed
here in torch on the file's weights as lowbit loads them (transformers' GGUF dequantization): the
file's text tokenized by llama.cpp, chunks of 512, each scored on its second half (llama-perplexity's
``first = n_ctx / 2``). Rows go to bench/results/qwen_scale.json (.md), one per name, replaced when
run again.
"""

from __future__ import annotations

import argparse
import sys
import json
import math
import re
import subprocess
import time
from pathlib import Path

import torch

from bench_results import write_results

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "qwen_scale.json"
MODEL = "qwen2.5-coder-1.5b"
TOOLS = ROOT / "out" / "llama.cpp" / "0.3.36" / "bin"


def _save(rows: dict[str, dict]) -> None:
    old = json.loads(RESULTS.read_text())["rows"] if RESULTS.is_file() else {}
    old.update(rows)
    table = ["| name | what | value |", "|---|---|---|"]
    for name, row in old.items():
        table += [f"| {name} | {k} | {v} |" for k, v in row.items() if k != "command"]
        table.append(f"| {name} | command | `{row['command']}` |")
    write_results(RESULTS, {"rows": old}, table)


def run_kl(source: str, checkpoints: list[str], ggufs: list[str], windows: int, command: str) -> dict[str, dict]:
    import lowbit
    from lowbit.evaluate.perplexity import evaluate_models
    from lowbit.evaluate.text import default_eval_path, read_text, token_windows
    from lowbit.gguf.llama_cpp import LlamaCppModel
    from lowbit.nn import prepare_kernels
    from lowbit.sources import needs_bos

    torch.set_num_threads(1)
    reference, tokenizer = lowbit.load(source)
    prepare_kernels(reference, activations="float32")
    ids = token_windows(read_text(default_eval_path()), tokenizer, 512, windows)
    bos = tokenizer.bos_token_id if needs_bos(tokenizer) else None
    models, names = [], []
    for path in checkpoints:
        model = lowbit.load(path)[0]
        prepare_kernels(model, activations="float32")
        models.append(model)
        names.append(f"kl {Path(path).name} (lowbit)")
    for path in ggufs:
        models.append(LlamaCppModel(path, n_ctx=512 + (bos is not None)))
        names.append(f"kl {Path(path).name} (llama.cpp)")
    results = evaluate_models(models, ids, bos_id=bos, reference=reference, progress=True)
    return {name: {"windows": f"{ids.shape[0]} x {ids.shape[1]}", "ppl": round(r.ppl, 4), "kl": round(r.kld, 5),
                   "top1": round(r.top1, 4), "seconds": round(r.seconds, 1), "command": command}
            for name, r in zip(names, results)}


def _tokenizer_probe(source: str, gguf: Path) -> dict:
    import llama_cpp
    from transformers import AutoTokenizer

    from lowbit.evaluate.text import default_eval_path, read_text
    from lowbit.gguf.metadata import _PROBE
    from lowbit.sources import resolve_model

    hf = AutoTokenizer.from_pretrained(resolve_model(source).path)
    vocab = llama_cpp.Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    texts = {"probe": _PROBE, "wikitext": read_text(default_eval_path())[:20_000]}
    out = {}
    for name, text in texts.items():
        ours = vocab.tokenize(text.encode(), add_bos=False, special=False)
        theirs = hf(text, add_special_tokens=False)["input_ids"]
        out[f"token ids equal ({name}, {len(theirs)} tokens)"] = ours == theirs
    return out


def _llama_perplexity(gguf: Path, text: Path, chunks: int) -> float:
    done = subprocess.run([str(TOOLS / "llama-perplexity"), "-m", str(gguf), "-f", str(text), "-c", "512",
                           "--chunks", str(chunks), "-t", "1", "-b", "512"], capture_output=True, text=True)
    found = re.search(r"Final estimate: PPL = ([0-9.]+)", done.stdout + done.stderr)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"llama-perplexity failed ({done.returncode}): {(done.stdout + done.stderr)[-2000:]}")
    return float(found.group(1))


@torch.no_grad()
def _torch_perplexity(gguf: Path, text: Path, chunks: int) -> float:
    """llama-perplexity's protocol on lowbit's reading of ``gguf``, with llama.cpp's token ids."""
    import llama_cpp

    import lowbit

    vocab = llama_cpp.Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    add_bos = vocab.metadata.get("tokenizer.ggml.add_bos_token") == "true"
    tokens = vocab.tokenize(text.read_bytes(), add_bos=add_bos, special=False)
    model = lowbit.load(str(gguf))[0].eval()
    n_ctx, first = 512, 256
    nll, count = 0.0, 0
    for i in range(min(chunks, len(tokens) // n_ctx)):
        chunk = torch.tensor([tokens[i * n_ctx:(i + 1) * n_ctx]])
        if add_bos:
            chunk[0, 0] = vocab.token_bos()
        logp = torch.log_softmax(model(chunk).logits[0].double(), dim=-1)
        targets = chunk[0, first + 1:]
        nll -= float(logp[first:n_ctx - 1].gather(1, targets[:, None]).sum())
        count += n_ctx - 1 - first
    return math.exp(nll / count)


def run_llama_cpp(source: str, gguf: Path, chunks: int, command: str) -> dict[str, dict]:
    from lowbit.evaluate.text import default_eval_path

    torch.set_num_threads(1)
    text = default_eval_path()
    row: dict = {**_tokenizer_probe(source, gguf)}
    start = time.perf_counter()
    row["llama-perplexity PPL"] = _llama_perplexity(gguf, text, chunks)
    row["llama-perplexity seconds"] = round(time.perf_counter() - start, 1)
    row["lowbit (torch) PPL, same protocol"] = round(_torch_perplexity(gguf, text, chunks), 4)
    row["ratio"] = round(row["lowbit (torch) PPL, same protocol"] / row["llama-perplexity PPL"], 5)
    row["chunks"] = f"{chunks} x 512, second halves scored"
    row["command"] = command
    return {f"llama.cpp {gguf.name}": row}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    kl = sub.add_parser("kl")
    kl.add_argument("--checkpoint", action="append", default=[])
    kl.add_argument("--gguf", action="append", default=[])
    kl.add_argument("--windows", type=int, default=16)
    kl.add_argument("--model", default=MODEL, help="the float model (default: %(default)s)")
    lc = sub.add_parser("llama-cpp")
    lc.add_argument("gguf", type=Path)
    lc.add_argument("--chunks", type=int, default=4)
    lc.add_argument("--model", default=MODEL, help="the float model whose tokenizer is compared")
    args = parser.parse_args()

    command = "python bench/qwen_scale.py " + " ".join(sys.argv[1:])
    rows = (run_kl(args.model, args.checkpoint, args.gguf, args.windows, command) if args.what == "kl"
            else run_llama_cpp(args.model, args.gguf, args.chunks, command))
    _save(rows)
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

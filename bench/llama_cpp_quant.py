#!/usr/bin/env python
r"""llama.cpp's own quantization as the benchmark's baseline: convert, imatrix, quantize, score.

The helpers run llama.cpp's tools, built by ``bench/llama_cpp_tools.sh`` from the same llama.cpp
commit as the installed llama-cpp-python, on any F32/F16 GGUF (for instance one exported by
lowbit). ``main`` makes the baseline rows for one Hugging Face model:

1. ``convert_hf_to_gguf.py`` (vendored in the llama-cpp-python sdist) writes an F32 GGUF;
2. ``llama-imatrix`` collects an importance matrix on WikiText-2 valid (calibration text,
   disjoint from the test split): ``--chunks 128 -c 512``, as lowbit's 128 x 512 calibration;
3. ``llama-quantize`` makes each type with and without that imatrix;
4. every file is scored through llama-cpp-python on the first N 512-token windows of WikiText-2
   raw test (the project protocol), with KL divergence and top-1 agreement against the F32 GGUF
   run by the same llama.cpp, so the only difference is the quantization.

    OMP_NUM_THREADS=1 python bench/llama_cpp_quant.py --model smollm2-135m --windows 8 --types Q4_K_M

Writes ``out/llama.cpp/baseline-<model>/`` (GGUFs, imatrix, logs, ``results.json``) and prints a
Markdown table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from lowbit.evaluate.text import (
    default_data_dir,
    default_eval_path,
    read_text,
    token_windows,
)
from lowbit.gguf.llama_cpp import llama_cpp_logits, llama_cpp_version
from lowbit.sources import lowbit_home, needs_bos

ROOT = Path(__file__).resolve().parent.parent
SEQLEN = 512


def tools_bin(version: str | None = None) -> Path:
    """Directory holding llama-quantize, llama-imatrix and llama-perplexity for ``version`` (default:
    the installed llama-cpp-python), building them first when needed (minutes; a no-op after)."""
    version = version or llama_cpp_version()
    out = subprocess.run(["bash", str(ROOT / "bench" / "llama_cpp_tools.sh"), version], cwd=ROOT,
                         check=True, stdout=subprocess.PIPE, text=True)
    return ROOT / out.stdout.strip().splitlines()[-1]


def vendored_llama_cpp(version: str | None = None) -> Path:
    """The llama.cpp source tree unpacked by ``llama_cpp_tools.sh`` (convert script, gguf-py)."""
    version = version or llama_cpp_version()
    tools_bin(version)
    return ROOT / "out" / "llama.cpp" / version / "src" / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"


def _run(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> float:
    """Run ``cmd`` with its output in ``log``; return the wall seconds. Raises RuntimeError with
    the log's tail when the command fails."""
    start = time.perf_counter()
    with open(log, "w") as fh:
        fh.write(" ".join(cmd) + "\n")
        fh.flush()
        proc = subprocess.run(cmd, check=False, stdout=fh, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-15:])
        raise RuntimeError(f"{Path(cmd[0]).name} failed (exit {proc.returncode}); log {log}:\n{tail}")
    return time.perf_counter() - start


def convert_hf_to_gguf(hf_dir: Path, out_path: Path, outtype: str = "f32") -> float:
    """Convert a Hugging Face directory to a GGUF with llama.cpp's vendored converter; seconds taken.

    The converter imports the vendored ``gguf-py`` (it may be newer than the one on PyPI)."""
    src = vendored_llama_cpp()
    env = {**os.environ, "PYTHONPATH": str(src / "gguf-py"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(src / "convert_hf_to_gguf.py"), str(hf_dir), "--outfile", str(out_path),
           "--outtype", outtype]
    return _run(cmd, out_path.with_suffix(".log"), env)


def llama_imatrix(model: Path, calib_text: Path, out_path: Path, *, ctx: int = SEQLEN, chunks: int = 128,
                  threads: int = 1) -> float:
    """``llama-imatrix`` over the first ``chunks`` chunks of ``ctx`` tokens of ``calib_text``
    (llama.cpp tokenizes it); writes ``out_path`` (GGUF format when it ends in .gguf) and returns
    the seconds taken. Note ``--chunk N`` would *skip* N chunks; ``--chunks N`` is the count. The tool
    writes its output every 10 chunks, so it writes beside ``out_path`` and the file is renamed into
    place only when the run completes: an interrupted run leaves no imatrix that looks finished."""
    partial = out_path.with_name(out_path.stem + ".partial" + out_path.suffix)  # it saves every 10 chunks
    cmd = [str(tools_bin() / "llama-imatrix"), "-m", str(model), "-f", str(calib_text), "-o", str(partial),
           "-c", str(ctx), "--chunks", str(chunks), "-t", str(threads)]
    seconds = _run(cmd, out_path.with_suffix(".log"))
    partial.replace(out_path)
    return seconds


def llama_quantize(src: Path, dst: Path, type_name: str, *, imatrix: Path | None = None, threads: int = 1,
                   allow_requantize: bool = False) -> float:
    """``llama-quantize src dst TYPE`` (``--imatrix`` when given); returns the seconds taken.

    ``src`` should be F32/F16/BF16; a quantized source needs ``allow_requantize`` and loses quality."""
    cmd = [str(tools_bin() / "llama-quantize")]
    cmd += ["--imatrix", str(imatrix)] if imatrix is not None else []
    cmd += ["--allow-requantize"] if allow_requantize else []
    cmd += [str(src), str(dst), type_name, str(threads)]
    return _run(cmd, dst.with_suffix(".log"))


def score(models: list[Path], reference: Iterable[np.ndarray] | None, inputs: list[list[int]],
          threads: int = 1, *, with_reference: bool = False) -> list[dict[str, float]]:
    """Perplexity of each of ``models`` on ``inputs`` (token 0 of each is context only) and, over the
    same positions, KL(reference || model) and top-1 agreement against ``reference``: the logits
    llama.cpp gives for the F32 file on the same inputs, one array per input (a list computed once,
    or a fresh ``llama_cpp_logits`` iterator when a list would not fit in memory; None: no KL).
    ``with_reference``: the first row is the reference's own (its perplexity; KL 0, top-1 1), from
    the same logits, so the F32 file needs no second pass.

    The models run in lockstep, window by window, so only one window's logits per model is alive
    and each reference window's log-softmax is computed once for all of them.
    """
    if with_reference and reference is None:
        raise ValueError("with_reference needs the reference logits")
    streams = [llama_cpp_logits(m, inputs, threads) for m in models]
    refs = iter(reference) if reference is not None else itertools.repeat(None)
    sums = [{"nll": 0.0, "kl": 0.0, "agree": 0.0, "seconds": 0.0} for _ in range(len(models) + 1)]
    count = 0
    for ids in inputs:
        target = torch.tensor(ids[1:]).unsqueeze(-1)
        start = time.perf_counter()
        ref = next(refs)
        ref_lp = None if ref is None else torch.log_softmax(torch.from_numpy(ref[:-1]), dim=-1)
        sums[0]["seconds"] += time.perf_counter() - start
        if ref_lp is not None:
            sums[0]["nll"] -= ref_lp.gather(-1, target).double().sum().item()
            sums[0]["agree"] += len(ids) - 1
            ref_p, ref_top = ref_lp.exp(), ref_lp.argmax(-1)
        for acc, stream in zip(sums[1:], streams, strict=True):
            start = time.perf_counter()
            lp = torch.log_softmax(torch.from_numpy(next(stream)[:-1]), dim=-1)
            acc["seconds"] += time.perf_counter() - start
            acc["nll"] -= lp.gather(-1, target).double().sum().item()
            if ref_lp is not None:
                acc["kl"] += (ref_p * (ref_lp - lp)).sum(-1).double().sum().item()
                acc["agree"] += (ref_top == lp.argmax(-1)).sum().item()
        count += len(ids) - 1
    for stream in streams:
        stream.close()
    return [{"ppl": math.exp(a["nll"] / count), "kld": a["kl"] / count,
             "top1": 1.0 if reference is None else a["agree"] / count, "tokens": count,
             "seconds": a["seconds"]} for a in (sums if with_reference else sums[1:])]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="demo model name (pulled) or Hugging Face directory")
    p.add_argument("--types", nargs="+", default=["Q4_K_M"], help="llama-quantize type names")
    p.add_argument("--windows", type=int, default=8, help="512-token WikiText-2 raw test windows to score")
    p.add_argument("--calib-chunks", type=int, default=128, help="512-token chunks of WikiText-2 valid for imatrix")
    # 1 by default: ggml's threads spin at barriers, so on 2 cores shared with other work 2 threads
    # ran 3-4x slower than 1 (SmolLM2, 512 tokens: 10 s vs 2.7 s); use more on an idle machine.
    p.add_argument("--threads", type=int, default=1, help="llama.cpp threads (default 1)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoTokenizer

    args = parse_args(argv)
    hf_dir = Path(args.model) if Path(args.model).is_dir() else lowbit_home() / "models" / args.model / "hf"
    name = hf_dir.name if Path(args.model).is_dir() else args.model
    work = ROOT / "out" / "llama.cpp" / f"baseline-{name}"
    work.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}

    f32 = work / "F32.gguf"
    if not f32.is_file():
        seconds["convert F32"] = convert_hf_to_gguf(hf_dir, f32, "f32")
    imatrix = work / f"imatrix-wikitext2-valid-{args.calib_chunks}x{SEQLEN}.gguf"
    if not imatrix.is_file():
        calib = default_data_dir() / "wikitext-2" / "valid.txt"
        seconds["imatrix"] = llama_imatrix(f32, calib, imatrix, chunks=args.calib_chunks, threads=args.threads)
    files = {"F32": f32}
    for t in args.types:
        for suffix, im in (("", None), ("+imatrix", imatrix)):
            dst = work / f"{t}{'-imatrix' if im else ''}.gguf"
            if not dst.is_file():
                seconds[f"quantize {t}{suffix}"] = llama_quantize(f32, dst, t, imatrix=im, threads=args.threads)
            files[t + suffix] = dst

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    bos_id = tokenizer.bos_token_id if needs_bos(tokenizer) else None
    windows = token_windows(read_text(default_eval_path()), tokenizer, SEQLEN, args.windows)
    inputs = [([bos_id] if bos_id is not None else []) + w.tolist() for w in windows]
    reference = list(llama_cpp_logits(f32, inputs, args.threads))
    labels = list(files)  # "F32" first: the reference's own row
    results = score([files[k] for k in labels[1:]], reference, inputs, args.threads, with_reference=True)
    rows = []
    for label, r in zip(labels, results, strict=True):
        rows.append({"file": label, "MiB": files[label].stat().st_size / 2**20, **r})
        print(f"{label}: ppl {r['ppl']:.3f} kld {r['kld']:.4f} top1 {r['top1']:.3f} ({r['seconds']:.1f} s)",
              file=sys.stderr)

    meta = {"command": " ".join(["python", "bench/llama_cpp_quant.py", *(argv or sys.argv[1:])]),
            "llama_cpp_python": llama_cpp_version(), "model": name, "windows": args.windows, "seqlen": SEQLEN,
            "bos": bos_id is not None, "imatrix": f"{args.calib_chunks}x{SEQLEN} wikitext-2 valid.txt",
            "threads": args.threads, "date": time.strftime("%Y-%m-%d"), "seconds": seconds}
    (work / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print("| file | MiB | ppl | KL vs F32 | top-1 vs F32 |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['file']} | {r['MiB']:.1f} | {r['ppl']:.3f} | {r['kld']:.4f} | {r['top1']:.3f} |")
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main())

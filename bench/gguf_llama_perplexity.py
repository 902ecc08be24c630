"""The GGUF benchmark on a model too large to score through llama-cpp-python: llama.cpp's
quantization (with and without its imatrix) against lowbit's export of the same type, every file
scored by ``llama-perplexity --kl-divergence`` against the F32 file (issue 22's GGUF rows).

    python bench/gguf_llama_perplexity.py --model qwen2.5-coder-1.5b --types Q3_K_M Q2_K \
        [--windows 16] [--calib 8] [--work DIR]

bench/gguf_files.py scores each file through llama-cpp-python with every position's logits; on
Qwen2.5-Coder-1.5B that path (bench/qwen_scale.py kl, 16 windows, beside lowbit's float model) took
2,200 s for one file, where ``llama-perplexity`` took 240-360 s per quantized file and 440 s for the
F32 logits (one thread each, on 2 cores shared with other jobs). Its protocol: the text is
WikiText-2 raw test joined as the project's protocol joins it (lowbit.evaluate.text.read_text,
written once to the work directory; llama.cpp's tokenizer gives Qwen the same ids as its Hugging
Face tokenizer, checked in qwen_scale.md), cut into the first N chunks of 512 tokens, each chunk
scored on its second half (tokens 256..511, 255 predictions per chunk). The F32 file's logits are
saved once (``--kl-divergence-base``); every other file is scored on the same tokens: perplexity,
mean KL(F32 || file) and top-1 agreement ("Same top p").

Files, each made once in the work directory and kept (a re-run resumes; each made file has a
``<name>.seconds.json`` with the seconds its making took):

- ``llama.cpp-F32.gguf``: llama.cpp's conversion of the pulled checkpoint;
- ``llama.cpp-imatrix-Cx512.gguf``: ``llama-imatrix`` over the first C chunks of 512 tokens of
  WikiText-2 valid;
- ``lowbit-importance-Cx512.safetensors``: lowbit's importance (mean x^2 per input column of every
  linear, the imatrix) from C random windows of 512 tokens of the same text, run block by block;
- per type: ``llama-quantize`` plain and ``--imatrix`` (``--pure`` for the plain types, as lowbit
  writes them; the mixes follow llama.cpp's rules in both tools), and lowbit's ``export_gguf`` with
  that importance (``lowbit export-gguf --imatrix``: block scales searched under the importance).
  GPTQ onto the block grids (bench/gguf_files.py's lowbit row) is left out here: on Qwen it took
  about 120 s per decoder block at one thread (a 2-block probe), over an hour per file.

Each row is written to bench/results/gguf_<model>.{json,md} as it is scored; a re-run keeps the rows
whose file is unchanged (same size and modification time) and scored on the same windows. The
tensor types of each type's files are compared: the table marks a file whose types differ from
llama.cpp's file with an imatrix, and lists each file's type counts.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_results import write_results
from gguf_files import MIXES, llama_quantize, tensor_types
from llama_cpp_quant import SEQLEN, _run, convert_hf_to_gguf, llama_imatrix, tools_bin

from lowbit.evaluate.text import default_data_dir, default_eval_path, read_text
from lowbit.sources import lowbit_home, needs_bos

ROOT = Path(__file__).resolve().parent.parent
LOWBIT = "lowbit (imatrix search)"
PLAIN, IMATRIX = "llama.cpp", "llama.cpp + imatrix"


def made(path: Path, make) -> float:
    """Make ``path`` with ``make()`` (which returns the seconds it took) unless it exists; the
    seconds, from a ``.seconds.json`` beside the file, either way."""
    note = path.with_name(path.name + ".seconds.json")
    if not path.is_file():
        seconds = make()
        note.write_text(json.dumps({"seconds": round(seconds, 1)}) + "\n")
    return json.loads(note.read_text())["seconds"]


def staged(make, dst: Path) -> float:
    """``make(partial)`` (a tool writing a file, returning seconds) into a sibling name, renamed to
    ``dst`` when it completes: an interrupted tool leaves nothing that looks finished."""
    partial = dst.with_name(dst.stem + ".partial" + dst.suffix)
    seconds = make(partial)
    partial.replace(dst)
    return seconds


def lowbit_importance(model_name: str, dst: Path, samples: int) -> float:
    """Mean x^2 per input column of every linear over ``samples`` random 512-token windows of
    WikiText-2 valid (lowbit's calibration), written to ``dst`` as safetensors; seconds taken (load and
    write excluded)."""
    from safetensors.torch import save_file
    from torch import nn

    from lowbit.api import load
    from lowbit.pipeline.calibration import calibration_windows
    from lowbit.pipeline.statistics import InputMoments, stream_input_statistics

    model, tokenizer = load(model_name)
    start = time.perf_counter()
    bos_id = tokenizer.bos_token_id if needs_bos(tokenizer) else None
    calib = calibration_windows(tokenizer, samples=samples, seqlen=SEQLEN, seed=0, bos_id=bos_id)
    importance = {}
    for chunk in stream_input_statistics(model, calib, lambda m: isinstance(m, nn.Linear),
                                         new_record=lambda: InputMoments(hessian=False)):
        importance |= {name: record.sqmean.float().contiguous() for name, record in chunk.items()}
    seconds = time.perf_counter() - start
    save_file(importance, dst)
    return seconds


def lowbit_export(model_name: str, importance: Path, dst: Path, qtype: str) -> float:
    """lowbit's export of ``qtype`` with ``importance``; seconds taken (load excluded)."""
    from safetensors.torch import load_file

    from lowbit.api import load
    from lowbit.gguf.export import export_gguf

    model, tokenizer = load(model_name)
    weights = {name: t.numpy() for name, t in load_file(importance).items()}
    start = time.perf_counter()
    export_gguf(model, tokenizer, dst, qtype, importance=weights)
    return time.perf_counter() - start


def kl_base(f32: Path, text: Path, windows: int, dst: Path, log: Path) -> float:
    """``llama-perplexity --kl-divergence-base``: the F32 file's logits on the first ``windows``
    chunks of 512 tokens of ``text`` into ``dst``, its output into ``log``; seconds taken."""
    return _run([str(tools_bin() / "llama-perplexity"), "-m", str(f32), "-f", str(text), "-c", str(SEQLEN),
                 "--chunks", str(windows), "-t", "1", "--kl-divergence-base", str(dst)], log)


def kl_score(model: Path, base: Path) -> dict[str, float]:
    """``llama-perplexity --kl-divergence`` of ``model`` on ``base``'s tokens: perplexity, mean KL
    and top-1 agreement against the base logits, and the seconds taken."""
    log = model.with_name(model.stem + ".kl.log")
    seconds = _run([str(tools_bin() / "llama-perplexity"), "-m", str(model), "-c", str(SEQLEN),
                    "--kl-divergence-base", str(base), "--kl-divergence", "-t", "1"], log)
    text = log.read_text(errors="replace")
    return {"ppl": _number(r"Mean PPL\(Q\)\s*:\s*([0-9.]+)", text), "kld": _number(r"Mean\s+KLD:\s*([0-9.]+)", text),
            "top1": _number(r"Same top p:\s*([0-9.]+)", text) / 100, "base_ppl": _number(r"Mean PPL\(base\)\s*:\s*([0-9.]+)", text),
            "score_seconds": round(seconds, 1)}


def _number(pattern: str, text: str) -> float:
    found = re.search(pattern, text)
    if found is None:
        raise RuntimeError(f"llama-perplexity printed no {pattern!r}; see its log")
    return float(found.group(1))


def type_counts(types: dict[str, str]) -> str:
    """``"113 Q3_K, 81 Q4_K, 141 F32"``: a file's tensor types, most frequent first."""
    return ", ".join(f"{n} {t}" for t, n in Counter(types.values()).most_common())


def bits_per_weight(path: Path) -> float:
    """Bits per value of the file's tensors (every tensor, norms and biases included)."""
    import gguf

    tensors = gguf.GGUFReader(path).tensors
    return 8 * sum(int(t.n_bytes) for t in tensors) / sum(int(t.n_elements) for t in tensors)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--types", nargs="+", default=["Q3_K_M", "Q2_K"])
    ap.add_argument("--windows", type=int, default=16, help="chunks of 512 tokens of WikiText-2 raw test scored")
    ap.add_argument("--calib", type=int, default=8,
                    help="calibration windows of 512 tokens of WikiText-2 valid, for llama-imatrix and lowbit alike")
    ap.add_argument("--work", type=Path, default=None, help="where the files go (default out/bench/<model>/gguf)")
    ap.add_argument("--source-type", default="Q4_K_M",
                    help="the type the pulled float weights were dequantized from: its rows re-hit the source grid")
    args = ap.parse_args()
    torch.set_num_threads(1)
    work = args.work or ROOT / "out" / "bench" / args.model / "gguf"
    work.mkdir(parents=True, exist_ok=True)
    out = ROOT / "bench" / "results" / f"gguf_{args.model}.json"
    meta = {"command": " ".join(["python", "bench/gguf_llama_perplexity.py", *sys.argv[1:]]),
            "date": time.strftime("%Y-%m-%d"), "windows": args.windows, "seqlen": SEQLEN,
            "scored_positions": "second half of each chunk (llama-perplexity)",
            "calibration": f"llama-imatrix first {args.calib}x{SEQLEN}, lowbit {args.calib} random x{SEQLEN}, "
                           "WikiText-2 valid", "threads": 1, "source_type": args.source_type}
    previous = {}
    if out.is_file():
        last = json.loads(out.read_text())
        if all(last["meta"].get(k) == meta[k] for k in ("windows", "seqlen", "calibration")):
            previous = {r["path"]: r for r in last["rows"]}

    f32 = work / "llama.cpp-F32.gguf"
    hf_dir = lowbit_home() / "models" / args.model / "hf"
    seconds = {"llama.cpp convert F32": made(f32, lambda: staged(lambda p: convert_hf_to_gguf(hf_dir, p, "f32"), f32))}
    imatrix = work / f"llama.cpp-imatrix-{args.calib}x{SEQLEN}.gguf"
    calib_text = default_data_dir() / "wikitext-2" / "valid.txt"
    seconds["llama-imatrix"] = made(imatrix, lambda: llama_imatrix(f32, calib_text, imatrix, chunks=args.calib))
    importance = work / f"lowbit-importance-{args.calib}x{SEQLEN}.safetensors"
    seconds["lowbit importance"] = made(importance, lambda: staged(
        lambda p: lowbit_importance(args.model, p, args.calib), importance))
    text = work / "wiki.test.protocol.txt"
    text.write_text(read_text(default_eval_path()))
    base = work / f"F32-logits-{args.windows}x{SEQLEN}.kld"
    seconds["F32 logits"] = made(base, lambda: staged(
        lambda p: kl_base(f32, text, args.windows, p, base.with_suffix(".log")), base))

    rows = [r for r in previous.values() if r["file"] == "F32 (reference)"][:1]
    if not rows:
        rows = [{"type": "F32", "file": "F32 (reference)", "path": f32.name, "bytes": f32.stat().st_size,
                 "bpw": round(bits_per_weight(f32), 3), "make_seconds": seconds["llama.cpp convert F32"],
                 "ppl": _number(r"Final estimate: PPL = ([0-9.]+)", base.with_suffix(".log").read_text()),
                 "kld": 0.0, "top1": 1.0, "types": type_counts(tensor_types(f32)), "same_tensor_types": True}]
    rows += [r for r in previous.values() if r["type"] not in {"F32", *args.types}]  # types not redone: kept
    for qtype in args.types:
        files = {}
        for label, im in ((PLAIN, None), (IMATRIX, imatrix)):
            dst = work / f"llama.cpp-{qtype}{'-imatrix' if im else ''}.gguf"
            made_s = made(dst, lambda dst=dst, im=im: staged(
                lambda p: llama_quantize(f32, p, qtype, imatrix=im, threads=1, pure=qtype not in MIXES), dst))
            files[label] = (dst, made_s + (seconds["llama-imatrix"] if im else 0.0))
        dst = work / f"lowbit-{qtype}.gguf"
        made_s = made(dst, lambda dst=dst: lowbit_export(args.model, importance, dst, qtype))
        files[LOWBIT] = (dst, made_s + seconds["lowbit importance"])
        reference_types = tensor_types(files[IMATRIX][0])
        for label in (IMATRIX, LOWBIT, PLAIN):  # the comparison that matters first, should time run out
            path, make_seconds = files[label]
            stat = path.stat()
            key = {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
            old = previous.get(path.name)
            if old is not None and all(old.get(k) == v for k, v in key.items()):
                row = old
            else:
                types = tensor_types(path)
                row = {"type": qtype, "file": label, "path": path.name, **key, "bpw": round(bits_per_weight(path), 3),
                       "make_seconds": round(make_seconds, 1), **kl_score(path, base),
                       "types": type_counts(types), "same_tensor_types": types == reference_types}
            rows.append(row)
            write_results(out, {"meta": meta | {"seconds": seconds}, "rows": rows}, table(args, meta, seconds, rows))
            print(json.dumps(row), flush=True)


def table(args: argparse.Namespace, meta: dict, seconds: dict[str, float], rows: list[dict]) -> list[str]:
    lines = [f"# GGUF files run by llama.cpp: {args.model}", "",
             f"`{meta['command']}` ({meta['date']}); every tool at one thread. WikiText-2 raw test, the first "
             f"{args.windows} chunks of {SEQLEN} tokens, each scored on its second half by `llama-perplexity "
             "--kl-divergence` (llama.cpp's protocol, not the 511-position windows of gguf_files.py); KL and "
             "top-1 against the F32 file (llama.cpp's conversion of the pulled checkpoint). The float weights "
             f"are a dequantized {args.source_type}: a {args.source_type} file re-hits the source grid and is "
             "no measure of quantization loss. Calibration: "
             f"llama-imatrix on the first {args.calib} chunks of {SEQLEN} tokens of WikiText-2 valid, lowbit's "
             f"importance on {args.calib} random windows of {SEQLEN} of the same text (fewer than the SmolLM2 "
             "protocol's 128, for the CPU time). lowbit: `export_gguf` with its own importance (block scales "
             "searched under it, `lowbit export-gguf --imatrix`), no GPTQ. Seconds to make: wall time of the "
             "tool making the file, including the calibration pass it needs (llama-imatrix "
             f"{seconds['llama-imatrix']:.0f} s, lowbit's importance {seconds['lowbit importance']:.0f} s, each "
             "made once and shared by the types); one thread on 2 cores shared with other jobs, so noisy. "
             "Each type's files have the same tensor types (compared tensor by tensor) unless marked.", "",
             "| type | file | MiB | bpw | ppl | KL | top-1 | seconds to make | tensor types |",
             "|---|---|---|---|---|---|---|---|---|"]
    types = list(dict.fromkeys(["F32", *(r["type"] for r in rows)]))
    order = {label: i for i, label in enumerate(("F32 (reference)", PLAIN, IMATRIX, LOWBIT))}
    for r in sorted(rows, key=lambda r: (types.index(r["type"]), order[r["file"]])):
        note = " (re-hits the source grid)" if r["type"] == args.source_type else ""
        note += "" if r["same_tensor_types"] else " (types differ)"
        lines.append(f"| {r['type']} | {r['file']}{note} | {r['bytes'] / 2**20:.2f} | {r['bpw']:.3f} | "
                     f"{r['ppl']:.3f} | {r['kld']:.4f} | {r['top1']:.4f} | {r['make_seconds']:.0f} | {r['types']} |")
    return lines


if __name__ == "__main__":
    main()

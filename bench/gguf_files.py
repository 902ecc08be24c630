"""GGUF files scored by llama.cpp itself: llama.cpp's own quantization (with and without its imatrix)
against lowbit's export of the same type (issue 4's benchmark).

    python bench/gguf_files.py --model smollm2-135m [--types Q8_0 Q6_K ...] [--windows 64] [--lowbit-only]

For each type: ``llama-quantize`` on the F32 file, plain and with ``--imatrix`` (``llama-imatrix``
over 128 x 512 tokens of WikiText-2 valid), and lowbit's ``export_gguf`` with GPTQ onto the block
grids (Hessians and importance from 128 x 512 tokens of the same text, cleaned of its
``<unk>``/``@-@`` markers, collected block by block while each file is written). The F32 file is
llama.cpp's own conversion, or lowbit's (``--f32 lowbit``) where llama.cpp's converter cannot read
the checkpoint. Plain types are
made with ``llama-quantize --pure`` (every matrix the one type, as lowbit writes them); the mixes
follow llama.cpp's rules in both tools, so each type's files have the same tensor types and size
(checked). Every file is run by llama-cpp-python on the first N 512-token windows of WikiText-2 raw
test: perplexity, and KL divergence and top-1 agreement against llama.cpp running the F32 file.

Results: bench/results/gguf_<model>.{json,md} (``--results NAME``: bench/results/NAME.{json,md}). A run keeps the rows of types it does not redo when
the last results used the same windows and calibration (so types can be added one run at a time);
``--lowbit-only`` re-makes and re-scores lowbit's files and keeps llama.cpp's rows. Every row says
which run scored it (``scored_by``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from llama_cpp_quant import (
    SEQLEN,
    _run,
    convert_hf_to_gguf,
    llama_imatrix,
    score,
    tools_bin,
)

from lowbit.evaluate.text import (
    default_data_dir,
    default_eval_path,
    read_text,
    token_windows,
)
from lowbit.gguf.llama_cpp import llama_cpp_logits, llama_cpp_version
from lowbit.sources import lowbit_home, needs_bos

ROOT = Path(__file__).resolve().parent.parent
TYPES = ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K"]
MIXES = {"Q3_K_M", "Q4_K_M", "Q5_K_M", "IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0"}
LLAMA_QUANTIZE_NAMES = {"MXFP4": "MXFP4_MOE"}  # lowbit's plain MXFP4 is llama-quantize --pure MXFP4_MOE
LOWBIT = "lowbit (GPTQ on the block grid)"
F32_ROW = ("F32", "F32 (reference)")


def llama_quantize(src: Path, dst: Path, qtype: str, *, imatrix: Path | None, pure: bool, threads: int) -> float:
    """``llama-quantize [--imatrix F] [--pure] src dst TYPE``; seconds taken."""
    cmd = [str(tools_bin() / "llama-quantize"), *(["--imatrix", str(imatrix)] if imatrix else []),
           *(["--pure"] if pure else []), str(src), str(dst), LLAMA_QUANTIZE_NAMES.get(qtype, qtype), str(threads)]
    return _run(cmd, dst.with_suffix(".log"))


def lowbit_file(model_name: str, dst: Path, qtype: str, calib: torch.Tensor) -> float:
    """lowbit's export with GPTQ onto the block grids, its statistics collected block by block on
    ``calib`` as the export consumes them; seconds taken (statistics included)."""
    from torch import nn

    from lowbit.api import load
    from lowbit.gguf.export import export_gguf
    from lowbit.pipeline.statistics import InputMoments, stream_input_statistics

    model, tokenizer = load(model_name)
    start = time.perf_counter()
    statistics = stream_input_statistics(model, calib, lambda m: isinstance(m, nn.Linear),
                                         new_record=lambda: InputMoments(hessian=True))
    export_gguf(model, tokenizer, dst, qtype, statistics=statistics)
    return time.perf_counter() - start


def tensor_types(path: Path) -> dict[str, str]:
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--types", nargs="+", default=TYPES)
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--calib-samples", type=int, default=128, help="lowbit's calibration windows of 512 tokens")
    ap.add_argument("--imatrix-chunks", type=int, default=128, help="llama-imatrix's chunks of 512 tokens")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (lowbit's statistics and GPTQ)")
    ap.add_argument("--f32", choices=["llama.cpp", "lowbit"], default="llama.cpp",
                    help="who writes the F32 file every file is quantized from and scored against: llama.cpp's "
                         "convert_hf_to_gguf.py, or lowbit's export (for Gemma 3, whose converter needs the "
                         "SentencePiece tokenizer.model that a GGUF-derived checkpoint lacks)")
    ap.add_argument("--results", default=None,
                    help="results name in bench/results (default gguf_<model>); another name keeps that table apart")
    ap.add_argument("--lowbit-only", action="store_true",
                    help="re-export and re-score lowbit's files only, keeping llama.cpp's rows from the last results")
    ap.add_argument("--llama-threads", type=int, default=1,
                    help="llama.cpp threads (its workers busy-wait: on 2 shared cores 2 threads ran 3-4x slower)")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from lowbit.api import load
    from lowbit.pipeline.calibration import calibration_windows

    torch.set_num_threads(args.threads)
    hf_dir = lowbit_home() / "models" / args.model / "hf"
    work = ROOT / "out" / "bench" / args.model / "gguf"
    work.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    f32 = work / f"{args.f32}-F32.gguf"
    if not f32.is_file() and args.f32 == "llama.cpp":
        seconds["llama.cpp convert F32"] = convert_hf_to_gguf(hf_dir, f32, "f32")
    elif not f32.is_file():
        from lowbit.gguf.export import export_gguf

        start = time.perf_counter()
        export_gguf(*load(args.model), f32, "F32")
        seconds["lowbit export F32"] = time.perf_counter() - start
    imatrix = work / f"llama.cpp-imatrix-{args.imatrix_chunks}x{SEQLEN}.gguf"
    if not imatrix.is_file():
        seconds["llama-imatrix"] = llama_imatrix(f32, default_data_dir() / "wikitext-2" / "valid.txt", imatrix,
                                                 chunks=args.imatrix_chunks, threads=args.llama_threads)
    model, tokenizer = load(args.model)
    bos_id = tokenizer.bos_token_id if needs_bos(tokenizer) else None
    calib = calibration_windows(tokenizer, samples=args.calib_samples, seqlen=SEQLEN, seed=0, bos_id=bos_id)
    del model

    rows = []
    previous = last_rows(args)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    windows = token_windows(read_text(default_eval_path()), tokenizer, SEQLEN, args.windows)
    inputs = [([bos_id] if bos_id is not None else []) + w.tolist() for w in windows]
    # The F32 logits are computed once and kept when they fit in memory (SmolLM2, 64 windows: 6.4 GB);
    # otherwise (Gemma 3's 262k vocabulary: 34 GB) llama.cpp recomputes them beside each type's files.
    reference_bytes = sum(len(ids) for ids in inputs) * len(tokenizer) * 4
    reference = None
    if reference_bytes < 8 * 2**30:
        start = time.perf_counter()
        reference = list(llama_cpp_logits(f32, inputs, args.llama_threads))
        seconds["llama.cpp F32 reference logits"] = time.perf_counter() - start
    for i, qtype in enumerate(args.types):
        files = {}
        for label, im in (("llama.cpp", None), ("llama.cpp + imatrix", imatrix)):
            dst = work / f"llama.cpp-{qtype}{'-imatrix' if im else ''}.gguf"
            if not dst.is_file():
                seconds[f"{label} {qtype}"] = llama_quantize(f32, dst, qtype, imatrix=im, threads=args.llama_threads,
                                                             pure=qtype not in MIXES)
            files[label] = dst
        dst = work / f"lowbit-{qtype}.gguf"
        seconds[f"lowbit {qtype}"] = lowbit_file(args.model, dst, qtype, calib)
        files[LOWBIT] = dst
        # lowbit's file has calibration statistics, so its tensor types are those llama.cpp gives with
        # an imatrix (IQ4_NL/IQ4_XS keep early ffn_down in Q5_K only without one)
        types = {label: tensor_types(p) for label, p in files.items()}
        same_types = {label: t == types["llama.cpp + imatrix"] for label, t in types.items()}
        fresh = [label for label in files if not (args.lowbit_only and label != LOWBIT and (qtype, label) in previous)]
        # the F32 row (first type only) comes from the reference logits themselves: no second pass
        f32_fresh = i == 0 and not (args.lowbit_only and F32_ROW in previous)
        refs = reference if reference is not None else llama_cpp_logits(f32, inputs, args.llama_threads)
        scored = score([files[label] for label in fresh], refs, inputs, args.llama_threads, with_reference=f32_fresh)
        new_rows = []
        if i == 0:
            new_rows.append(row(F32_ROW, f32, True, scored.pop(0)) if f32_fresh else previous[F32_ROW] | {"reused": True})
        scores = dict(zip(fresh, scored, strict=True))
        for label, path in files.items():
            if label in scores:
                new_rows.append(row((qtype, label), path, same_types[label], scores[label]))
            else:
                new_rows.append(previous[(qtype, label)] | {"reused": True})
        for r in new_rows:
            print(json.dumps(r), flush=True)
        rows += new_rows
        write_results(args, with_previous(rows, previous), seconds, bos_id is not None)


def row(key: tuple[str, str], path: Path, same_types: bool, scores: dict[str, float]) -> dict:
    """One freshly scored results row."""
    return {"type": key[0], "file": key[1], "bytes": path.stat().st_size, "same_tensor_types": same_types, **scores,
            "scored_by": this_run()}


def command() -> str:
    return " ".join(["python", "bench/gguf_files.py", *sys.argv[1:]])


def this_run() -> str:
    return f"`{command()}` ({time.strftime('%Y-%m-%d')})"


def last_rows(args: argparse.Namespace) -> dict[tuple[str, str], dict]:
    """The last results' rows by (type, file), each with the run that scored it, when that run used the
    same windows and calibration (``--lowbit-only`` requires it). A run keeps the rows of the types it
    does not redo, so types can be added to a results file one run at a time."""
    path = ROOT / "bench" / "results" / f"{results_name(args)}.json"
    if not path.is_file():
        if args.lowbit_only:
            raise SystemExit(f"--lowbit-only needs earlier results in {path}")
        return {}
    last = json.loads(path.read_text())
    meta = last["meta"]
    calibration = f"lowbit {args.calib_samples}x{SEQLEN}, llama-imatrix {args.imatrix_chunks}x{SEQLEN} WikiText-2 valid"
    if meta["windows"] != args.windows or meta["calibration"] != calibration:
        if args.lowbit_only:
            raise SystemExit(f"--lowbit-only: the last results used {meta['windows']} windows and "
                             f"{meta['calibration']}, not {args.windows} and {calibration}")
        return {}
    run = f"`{meta['command']}` ({meta['date']})"
    return {(r["type"], r["file"]): {k: v for k, v in r.items() if k != "reused"}
            | {"scored_by": r.get("scored_by") or (meta.get("reused_from") if r.get("reused") else run)}
            for r in last["rows"]}


def with_previous(rows: list[dict], previous: dict[tuple[str, str], dict]) -> list[dict]:
    """``rows``, plus (with ``--lowbit-only``) the last results' rows of the types this run did not
    redo, marked reused, in the last results' order."""
    redone = {r["type"] for r in rows}
    ordered = []
    for (kind, _), row in previous.items():
        if kind not in redone:
            ordered.append(row | {"reused": True})
        elif kind not in {r["type"] for r in ordered}:
            ordered += [r for r in rows if r["type"] == kind]
    return ordered + [r for r in rows if r["type"] not in {o["type"] for o in ordered}]


def results_name(args: argparse.Namespace) -> str:
    return args.results or f"gguf_{args.model}"


def write_results(args: argparse.Namespace, rows: list[dict], seconds: dict[str, float], bos: bool) -> None:
    meta = {"command": command(), "date": time.strftime("%Y-%m-%d"),
            "f32": args.f32,
            "llama_cpp_python": llama_cpp_version(), "windows": args.windows, "seqlen": SEQLEN, "bos": bos,
            "calibration": f"lowbit {args.calib_samples}x{SEQLEN}, llama-imatrix {args.imatrix_chunks}x{SEQLEN} "
                           "WikiText-2 valid", "threads": args.threads, "llama_threads": args.llama_threads,
            "seconds": seconds}
    results = ROOT / "bench" / "results"
    (results / f"{results_name(args)}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [f"# GGUF files run by llama.cpp: {args.model}", "",
             (f"`{meta['command']}` ({meta['date']}, llama-cpp-python {meta['llama_cpp_python']}). WikiText-2 raw "
             f"test, first {args.windows} windows of {SEQLEN}; KL and top-1 against llama.cpp running the F32 "
             f"file ({args.f32}'s conversion). Each file has the tensor types of llama.cpp's file with an imatrix "
             "unless marked (IQ4_NL/IQ4_XS without an imatrix keep the first eighth of ffn_down in Q5_K)."), "",
             "| type | file | MiB | ppl | KL | top-1 |", "|---|---|---|---|---|---|"]
    for r in rows:
        mark = "" if r["same_tensor_types"] else " (types differ)"
        mark += " *" if r.get("reused") else ""
        lines.append(f"| {r['type']} | {r['file']}{mark} | {r['bytes'] / 2**20:.2f} | {r['ppl']:.3f} | "
                     f"{r['kld']:.4f} | {r['top1']:.4f} |")
    earlier = list(dict.fromkeys(r["scored_by"] for r in rows if r.get("reused")))
    if earlier:
        lines += ["", "\\* scored by an earlier run of the same windows, reference and calibration (the files are "
                  "unchanged): " + "; ".join(earlier) + "."]
    (results / f"{results_name(args)}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

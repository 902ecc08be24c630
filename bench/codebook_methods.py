"""Codebook methods (SqueezeLLM's lookup tables plus a sparse part) on the README protocol.

WikiText-2 raw test, the first 64 windows of 512 tokens (BOS first for models that need it), KL to
the float model over every predicted position; calibration: 128 windows of 512 tokens of cleaned
WikiText-2 validation, seed 0 (the file ``bench/weight_methods.py`` writes and reads, so the same
token ids as its GPTQ rows). lm_head stays float. Bits per weight count codes, tables and outliers.

Each quantization runs in its own process (``bench/quantize_one.py``: quantize time and peak RSS
of that process), up to ``--jobs`` at a time; checkpoints go to ``out/bench/<model>/`` and are
reused when present (delete them to re-measure). Each row is evaluated and written as soon as its
checkpoint exists; ``--resume`` keeps the rows already in the results file.

Run: ``python bench/codebook_methods.py --model smollm2-135m [--rows NAME,...] [--jobs 2]``.
Writes ``bench/results/codebook_methods_<model>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from bench_results import write_results

ROOT = Path(__file__).resolve().parent.parent
# name -> (setting label, method label, quantize CLI flags); squeezellm rows also get --fisher-samples.
ROWS = {
    "squeezellm-3": ("lut3 per-row + 0.25% outliers", "squeezellm",
                     ["--method", "squeezellm", "--bits", "3", "--outlier-fraction", "0.0025"]),
    "squeezellm-4": ("lut4 per-row + 0.25% outliers", "squeezellm",
                     ["--method", "squeezellm", "--bits", "4", "--outlier-fraction", "0.0025"]),
    # GPTQ beside them, on the same calibration ids: the best lowbit rows at <= 3.35 and <= 4.5 bpw
    # in the README's weight-method table.
    "gptq-mse-int3-g64": ("int3 g64", "gptq mse",
                          ["--method", "gptq", "--observer", "mse", "--bits", "3", "--group-size", "64", "--asym"]),
    "gptq-nf4-g64": ("nf4 g64", "gptq", ["--method", "gptq", "--format", "nf4", "--group-size", "64"]),
}


def start_quantize(model: str, flags: list[str], out: Path, calib: Path) -> subprocess.Popen | None:
    """A child process quantizing into ``out``, or None when ``out`` already holds a finished run."""
    if (out / "bench_run.json").is_file():
        return None
    cmd = [sys.executable, str(ROOT / "bench" / "quantize_one.py"), model, "-o", str(out), "--overwrite",
           "--calib-ids", str(calib), *flags]
    print("$", " ".join(cmd), file=sys.stderr, flush=True)
    return subprocess.Popen(cmd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--jobs", type=int, default=1, help="quantizations run at the same time")
    ap.add_argument("--fisher-samples", type=int, default=0,
                    help="calibration windows squeezellm's Fisher is computed on (default 0: all)")
    ap.add_argument("--resume", action="store_true", help="keep the rows already in the results file")
    args = ap.parse_args()

    from bench_setup import bench_setup

    from lowbit.api import load
    from lowbit.evaluate.perplexity import evaluate_models
    from lowbit.evaluate.size import size_report
    from lowbit.memory import page_out

    setup = bench_setup("bench/codebook_methods.py", args.model, args.calib_samples, args.windows)
    out_json = ROOT / "bench" / "results" / f"codebook_methods_{setup.name}.json"
    if (args.windows, args.calib_samples) != (64, 128):  # a screening run: its own results file
        out_json = out_json.with_name(f"codebook_methods_{setup.name}_{args.windows}w_{args.calib_samples}c.json")
    rows = json.loads(out_json.read_text())["rows"] if args.resume and out_json.is_file() else []
    done = {r["row"] for r in rows}
    todo = [name for name in args.rows.split(",") if name and name not in done]
    unknown = [name for name in todo if name not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; valid: {', '.join(ROWS)}")
    page_out(setup.reference.parameters())  # the children's RSS is their own (see weight_methods.py)
    running: dict[str, subprocess.Popen | None] = {}
    pending = list(todo)
    while pending or running:
        while pending and sum(p is not None for p in running.values()) < args.jobs:
            name = pending.pop(0)
            flags = ROWS[name][2] + (["--fisher-samples", str(args.fisher_samples)]
                                     if "squeezellm" in ROWS[name][2] and args.fisher_samples else [])
            running[name] = start_quantize(args.model, flags, setup.work / f"{name}-c{args.calib_samples}"
                                           f"-f{args.fisher_samples}", setup.calib_path)
        name = next((n for n, p in running.items() if p is None or p.poll() is not None), None)
        if name is None:
            next(p for p in running.values() if p is not None).wait()
            continue
        process = running.pop(name)
        if process is not None and process.returncode != 0:
            raise SystemExit(f"{name}: quantize_one.py failed with exit status {process.returncode}")
        out = setup.work / f"{name}-c{args.calib_samples}-f{args.fisher_samples}"
        run = json.loads((out / "bench_run.json").read_text())
        model = load(out)[0]
        setting, method, _ = ROWS[name]
        row = {"row": name, "setting": setting, "method": method, "tool": "lowbit", "bpw": size_report(model).bpw,
               "quantize_seconds": run["quantize_seconds"], "peak_rss_bytes": run["peak_rss_bytes"],
               "fisher_seconds": run.get("fisher_seconds"), "fisher_windows": run.get("fisher_windows")}
        row.update(evaluate_models([model], setup.windows, bos_id=setup.bos_id, reference=setup.reference)[0].to_dict())
        del model
        rows = [r for r in rows if r["row"] != name] + [row]
        write_results(out_json, {**setup.meta, "rows": rows}, markdown(setup.meta, rows))
    print("\n".join(markdown(setup.meta, rows)))


def markdown(meta: dict, rows: list[dict]) -> list[str]:
    lines = [(f"{meta['model']}: WikiText-2 test, {meta['windows']} x {meta['seqlen']} tokens, KL to float; "
              f"calibration {meta['calibration']}; `{meta['command']}`"), "",
             "| setting | method | bits/weight | ppl | KL | top-1 | quantize s | of it Fisher s | peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fisher = "-" if r.get("fisher_seconds") is None else f"{r['fisher_seconds']:.1f}"
        lines.append(f"| {r['setting']} | {r['method']} | {r['bpw']:.3f} | {r['ppl']:.3f} | {r['kld']:.4f} | "
                     f"{r['top1']:.3f} | {r['quantize_seconds']:.1f} | {fisher} | {r['peak_rss_bytes'] / 2**20:.0f} |")
    lines += ["", "quantize s counts the quantization call (Fisher passes included), peak RSS the whole process."]
    return lines


if __name__ == "__main__":
    main()

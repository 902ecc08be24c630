"""Vector and product quantization (GPTVQ) beside GPTQ at 2 and 3 bits per weight.

The protocol of ``bench/weight_methods.py`` (README): WikiText-2 raw test, the first 64 windows of
512 tokens (Gemma: 16 and 64 calibration windows), KL divergence to the float model over every
predicted position; calibration 128 windows of 512 tokens of cleaned WikiText-2 validation, seed
0, the same token ids for every row; lm_head stays float. Each quantization runs in its own
process (``bench/quantize_one.py``: quantize time and the process's peak RSS); checkpoints go to
``out/bench/<model>/`` and are reused when present. Rows are evaluated and written one at a time,
so a stopped run resumes with ``--resume``.

Run: ``python bench/vq_methods.py --model smollm2-135m [--rows "pq d4 k8 g64,gptq int2 g32"]``.
Writes ``bench/results/vq_methods_<model>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# name -> (bits class, quantize CLI flags); baselines in the same run, same calibration ids.
ROWS = {
    "pq d4 k8 g64": ("2-bit", ["--method", "pq", "--vq-dim", "4", "--codebook-bits", "8", "--group-size", "64"]),
    "gptq int2 g32": ("2-bit", ["--method", "gptq", "--bits", "2", "--group-size", "32", "--asym"]),
    "vq d4 k8 per-layer": ("2-bit", ["--method", "vq", "--vq-dim", "4", "--codebook-bits", "8"]),
    "pq d2 k6 g64": ("3-bit", ["--method", "pq", "--vq-dim", "2", "--codebook-bits", "6", "--group-size", "64"]),
    "gptq mse int3 g64": ("3-bit", ["--method", "gptq", "--observer", "mse", "--bits", "3", "--group-size", "64",
                                    "--asym"]),
}


def _slug(text: str) -> str:
    return text.replace(" ", "-")


def quantize_row(model: str, flags: list[str], out: Path, calib: Path) -> dict:
    """Quantize in a child process (unless ``out`` exists); its timing and peak RSS."""
    record = out / "bench_run.json"
    if not record.is_file():
        cmd = [sys.executable, str(ROOT / "bench" / "quantize_one.py"), model, "-o", str(out), "--calib-ids",
               str(calib), *flags]
        print("$", " ".join(cmd), file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True)
    return json.loads(record.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated names of ROWS: {', '.join(ROWS)}")
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--resume", action="store_true", help="keep the rows already in the results file")
    args = ap.parse_args()

    from bench_results import write_results
    from bench_setup import bench_setup

    from lowbit.api import load
    from lowbit.evaluate.perplexity import evaluate_models
    from lowbit.evaluate.size import size_report
    from lowbit.memory import page_out

    unknown = [r for r in args.rows.split(",") if r not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; valid: {', '.join(ROWS)}")
    setup = bench_setup("bench/vq_methods.py", args.model, args.calib_samples, args.windows)
    out_json = ROOT / "bench" / "results" / f"vq_methods_{setup.name}.json"
    rows = json.loads(out_json.read_text())["rows"] if args.resume and out_json.is_file() else []
    done = {r["row"] for r in rows}
    for name in [r for r in args.rows.split(",") if r not in done]:
        bits, flags = ROWS[name]
        out = setup.work / f"vq-bench-{_slug(name)}"
        page_out(setup.reference.parameters())  # the child's RSS is its own (see weight_methods.py)
        run = quantize_row(args.model, flags, out, setup.calib_path)
        model = load(out)[0]
        result = evaluate_models([model], setup.windows, bos_id=setup.bos_id, reference=setup.reference)[0]
        rows.append({"row": name, "bits": bits, "flags": " ".join(flags), "bpw": size_report(model).bpw,
                     **run, **result.to_dict()})
        del model
        write_results(out_json, {**setup.meta, "rows": rows}, markdown(setup.meta, rows))
    print("\n".join(markdown(setup.meta, rows)))


def markdown(meta: dict, rows: list[dict]) -> list[str]:
    lines = [(f"{meta['model']}: WikiText-2 test, {meta['windows']} x {meta['seqlen']} tokens, KL to float; "
              f"calibration {meta['calibration']}; `{meta['command']}`"), "",
             "| bits | row | quantize flags | bits/weight | ppl | KL | top-1 | quantize s | peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['bits']} | {r['row']} | `{r['flags']}` | {r['bpw']:.3f} | {r['ppl']:.3f} | {r['kld']:.4f} | "
                     f"{r['top1']:.3f} | {r['quantize_seconds']:.1f} | {r['peak_rss_bytes'] / 2**20:.0f} |")
    lines += ["", "bits/weight counts codes, scales, zero-points and codebooks (float16) of the quantized linears; "
              "quantize s is the quantization call, peak RSS the whole quantizing process."]
    return lines


if __name__ == "__main__":
    main()

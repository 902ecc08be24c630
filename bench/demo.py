"""`make demo`: pull SmolLM2-135M, quantize it three ways with the CLI, evaluate each against the
float model on WikiText-2, print a table. Every step is a `lowbit` command you can run yourself."""

from __future__ import annotations

import contextlib
import io
import json
import shlex
import sys
from pathlib import Path

from lowbit.cli import main as lowbit

OUT = Path("out")
WINDOWS = "16"  # 16 x 512 tokens keeps the demo to a few minutes on 2 cores; bench/ uses 64
RUNS = [
    ("int4 g64 asym", ["--bits", "4", "--group-size", "64", "--asym"]),
    ("nf4 g64 + double quant", ["--format", "nf4", "--group-size", "64", "--double-quant"]),
    ("int3 g64 asym", ["--bits", "3", "--group-size", "64", "--asym"]),
]


def run(argv: list[str], capture: bool = False) -> str:
    print("$ lowbit " + shlex.join(argv), file=sys.stderr)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf) if capture else contextlib.nullcontext():
        code = lowbit(argv)
    if code:
        raise SystemExit(code)
    return buf.getvalue()


def main() -> None:
    run(["pull", "smollm2-135m"])
    rows = [("float32", json.loads(run(["eval", "smollm2-135m", "--max-windows", WINDOWS, "--json"], True)))]
    for label, flags in RUNS:
        out = OUT / ("smollm2-" + label.replace(" ", "-").replace("+", "").replace("--", "-"))
        run(["quantize", "smollm2-135m", "-o", str(out), "--overwrite", *flags])
        rows.append((label, json.loads(run(["eval", str(out), "--max-windows", WINDOWS, "--reference",
                                            "smollm2-135m", "--json"], True))))
    print(f"\nSmolLM2-135M, WikiText-2 raw test, {WINDOWS} windows of 512 tokens, RTN")
    print(f"| {'scheme':<24} | {'bits/weight':>11} | {'size MiB':>8} | {'ppl':>8} | {'KL':>7} | {'top-1':>6} |")
    print(f"|{'-' * 26}|{'-' * 13}|{'-' * 10}|{'-' * 10}|{'-' * 9}|{'-' * 8}|")
    for label, r in rows:
        kld = f"{r['kld']:.4f}" if r.get("kld") is not None else "-"
        top1 = f"{r['top1']:.3f}" if r.get("top1") is not None else "-"
        print(f"| {label:<24} | {r['bpw']:>11.3f} | {r['size_bytes'] / 2**20:>8.1f} | {r['ppl']:>8.3f} "
              f"| {kld:>7} | {top1:>6} |")
    # Mixed precision: lowbit.auto picks each layer's scheme under a bits-per-weight budget (RTN here, for
    # speed); the table and plot (out/pareto/pareto.png) put the benchmark's 64-window rows beside it.
    bench = Path(__file__).resolve().parent / "results" / "mixed_precision_smollm2-135m.json"
    print()
    run(["pareto", "smollm2-135m", "--budgets", "3,3.5,4,4.5", "--windows", WINDOWS, "--calib-samples", "16",
         "-o", str(OUT / "pareto"), *(["--peers", str(bench)] if bench.is_file() else [])])


if __name__ == "__main__":
    main()

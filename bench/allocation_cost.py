"""What automatic mixed precision costs beside the quantization it plans, measured back to back.

    python bench/allocation_cost.py [--model smollm2-135m] [--budget 4] [--method gptq] [--calib-samples 128]

In one process at one thread, as ``lowbit quantize --target-bpw B --method M`` does it: the
sensitivity table of the block linears (``lowbit.auto.measure_sensitivity``: one forward and
backward pass over its windows, for GPTQ forward passes for the full Hessians of the GPTQ-aware
proxy, then every candidate scored), the knapsack solve, then the final
quantization of the allocated recipe on the calibration windows (README protocol: 128 x 512 tokens
of WikiText-2 valid). The row gives each part's seconds and the allocation's share of the
quantization's time. Rows go to bench/results/allocation_cost.json (.md), each written as it finishes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench_results import write_results  # this directory (sys.path[0])

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "allocation_cost.json"


def measure(model_name: str, budget_bpw: float, method: str, calib_samples: int) -> dict:
    import lowbit
    from bench_setup import bench_setup
    from lowbit.auto import Budget, allocate
    from lowbit.auto.allocate import block_linears
    from lowbit.auto.candidates import LOWBIT_CANDIDATES
    from lowbit.auto.sensitivity import GPTQ_PROXY_WINDOWS, PROXY_WINDOWS, measure_sensitivity
    from safetensors.torch import load_file

    setup = bench_setup("bench/allocation_cost.py", model_name, calib_samples, 1)
    calib = load_file(str(setup.calib_path))["input_ids"]
    reference = setup.reference
    start = time.perf_counter()
    names = block_linears(reference)
    table = measure_sensitivity(reference, calib, lambda n: LOWBIT_CANDIDATES, names, method=method, progress=False)
    table_seconds = time.perf_counter() - start
    start = time.perf_counter()
    allocation = allocate(reference, None, Budget(bpw=budget_bpw), method=method, table=table, progress=False)
    solve_seconds = time.perf_counter() - start
    del table
    model, _ = lowbit.load(model_name)
    start = time.perf_counter()
    lowbit.quantize(model, allocation.recipe, calibration=calib, progress=False)
    quantize_seconds = time.perf_counter() - start
    return {"model": setup.name, "budget_bpw": budget_bpw, "method": method, "calibration": setup.meta["calibration"],
            "proxy": "gptq" if method == "gptq" else "diagonal", "proxy_windows": PROXY_WINDOWS,
            "gptq_proxy_windows": GPTQ_PROXY_WINDOWS if method == "gptq" else 0,
            "tensors": len(names), "candidates": len(LOWBIT_CANDIDATES),
            "table_seconds": round(table_seconds, 1), "solve_seconds": round(solve_seconds, 1),
            "quantize_seconds": round(quantize_seconds, 1),
            "share": round((table_seconds + solve_seconds) / quantize_seconds, 4),
            "threads": torch.get_num_threads(), "date": setup.meta["date"], "command": setup.meta["command"]}


def _proxy(row: dict) -> str:
    """The row's proxy: ``gptq`` (errors as GPTQ leaves them) or ``diagonal`` (rows from before the
    GPTQ-aware proxy have no field and were diagonal)."""
    return row.get("proxy", "diagonal")


def table(rows: list[dict]) -> list[str]:
    lines = ["# Allocation cost against the quantization it plans", "",
             "`python bench/allocation_cost.py ...` (each row's command below); one process, one thread, the parts back "
             "to back: sensitivity table (one forward and backward pass over the proxy's windows, every candidate "
             "scored on every block linear), knapsack solve, then the final quantization of the allocated recipe.", "",
             "| model | budget bpw | method | calibration | proxy | proxy windows | table s | solve s | quantize s | "
             "allocation / quantization | command |", "|---|---:|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        windows = f"{r['proxy_windows']}" + (f" + {r['gptq_proxy_windows']} forward" if r.get("gptq_proxy_windows") else "")
        lines.append(f"| {r['model']} | {r['budget_bpw']:g} | {r['method']} | {r['calibration']} | "
                     f"{_proxy(r)} | {windows} | "
                     f"{r['table_seconds']} | {r['solve_seconds']} | {r['quantize_seconds']} | {100 * r['share']:.1f}% | "
                     f"`{r['command']}` |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--budget", type=float, default=4.0)
    ap.add_argument("--method", default="gptq")
    ap.add_argument("--calib-samples", type=int, default=128)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = json.loads(RESULTS.read_text())["rows"] if RESULTS.is_file() else []
    row = measure(args.model, args.budget, args.method, args.calib_samples)
    key = lambda r: (r["model"], r["budget_bpw"], r["method"], _proxy(r))  # noqa: E731
    rows = [r for r in rows if key(r) != key(row)] + [row]
    write_results(RESULTS, {"rows": rows}, table(rows))
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()

"""GPTQ's quantize time against model size (SmolLM2-135M, Gemma-3-270M, Qwen2.5-Coder-1.5B), and where it goes.

    python bench/quantize_time.py run [--models smollm2-135m gemma3-270m]
    python bench/quantize_time.py watch WORK_DIR --out BLOCKS.json     # beside a long streamed job
    python bench/quantize_time.py add NAME BLOCKS.json --seconds S --command "..."

``run``: GPTQ int4 with groups of 128 (64 for SmolLM2, whose 576-wide inputs 128 does not divide),
32 x 512 calibration tokens of WikiText-2 valid, 1 thread, through ``lowbit.quantize`` in this process.
Its report splits the wall time into each linear's solve (``layer_seconds``: Cholesky, the column
loop, the rounding), the rest of each block (forward passes that accumulate the Hessians and carry
the activations on), and what lies outside the blocks (capturing the first block's inputs).

A job too large for one sitting runs as a streamed job (``lowbit quantize --work-dir``), which keeps
each finished block's report in its work directory and removes the directory when it ends: ``watch``
copies the reports out as the blocks finish, and ``add`` turns them into a row, with the job's wall
time (e.g. from ``bench/memory_limit.py``'s row) as ``--seconds``.

GPTQ on a linear with ``n`` inputs and ``m`` outputs costs about ``tokens n^2`` to accumulate its
Hessian, ``n^3`` for the Cholesky factorizations and ``m n^2`` for the column updates. The table reports,
per model, the solve time of each kind of linear with its shape, the exponent of a least-squares fit
of ``log(solve seconds)`` on ``log(m n^2 + n^3)`` over every linear of every model row, and the time
per billion parameters. Rows go to bench/results/quantize_time.json (.md), each written as it finishes.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

import torch

from bench_results import write_results  # this directory (sys.path[0])

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "quantize_time.json"
SAMPLES, SEQLEN = 32, 512
GROUP = {"smollm2-135m": 64}  # others: 128


def _kind(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def row_from_blocks(blocks: list[dict], seconds: float, parameters: int, command: str) -> dict:
    """A row from the per-block reports (``layer_seconds``, ``block_seconds``, layer ``shape``s)."""
    layers, block_seconds = {}, 0.0
    for b in blocks:
        block_seconds += b["report"]["block_seconds"]
        for name, s in b["report"]["layer_seconds"].items():
            layers[name] = {"seconds": s, "shape": b["records"][name]["shape"]}
    solve = sum(v["seconds"] for v in layers.values())
    kinds: dict[str, dict] = {}
    for name, v in layers.items():
        k = kinds.setdefault(_kind(name), {"shape": v["shape"], "seconds": 0.0, "count": 0})
        k["seconds"] += v["seconds"]
        k["count"] += 1
    return {"parameters": parameters, "blocks": len(blocks), "seconds": seconds, "block_seconds": block_seconds,
            "solve_seconds": solve, "forward_seconds": block_seconds - solve,
            "outside_seconds": seconds - block_seconds, "kinds": kinds, "layers": layers, "command": command}


def run_model(name: str) -> dict:
    import lowbit
    from lowbit.pipeline.calibration import calibration_windows
    from lowbit.scheme import QuantScheme
    from lowbit.sources import needs_bos

    torch.set_num_threads(1)
    model, tokenizer = lowbit.load(name)
    parameters = sum(p.numel() for p in model.parameters())
    bos = tokenizer.bos_token_id if needs_bos(tokenizer) else None
    windows = calibration_windows(tokenizer, samples=SAMPLES, seqlen=SEQLEN, seed=0, bos_id=bos)
    group = GROUP.get(name, 128)
    recipe = lowbit.Recipe(method="gptq", default=QuantScheme(bits=4, granularity="group", group_size=group))
    start = time.perf_counter()
    report = lowbit.quantize(model, recipe, calibration=windows, progress=False)
    seconds = time.perf_counter() - start
    shapes = {n: list(m.layout.shape) for n, m in model.named_modules() if n in report.layer_seconds}  # QuantLinears
    blocks, per_block = [], {}
    for n, s in report.layer_seconds.items():
        block = re.match(r"(.*\.layers\.\d+)\.", n)
        if block:
            per_block.setdefault(block.group(1), {})[n] = s
    for i, (prefix, layer_seconds) in enumerate(per_block.items()):
        blocks.append({"report": {"block_seconds": report.block_seconds[i], "layer_seconds": layer_seconds},
                       "records": {n: {"shape": shapes[n]} for n in layer_seconds}})
    return row_from_blocks(blocks, seconds, parameters,
                           f"python bench/quantize_time.py run --models {name}  (gptq int4 g{group}, "
                           f"{SAMPLES} x {SEQLEN} calibration, 1 thread, in memory)")


def watch(work_dir: Path, out: Path, interval: float = 15.0) -> None:
    """Copy each finished block's report out of ``work_dir`` into ``out`` until the directory is gone."""
    from safetensors import safe_open

    got = json.loads(out.read_text()) if out.is_file() else {}
    seen_dir = False
    while True:
        if work_dir.is_dir():
            seen_dir = True
            for f in sorted(work_dir.glob("block-*.safetensors")):
                if f.name not in got:
                    try:
                        with safe_open(str(f), "pt") as h:
                            meta = h.metadata()
                    except Exception:  # being written, or removed meanwhile: the next pass reads it
                        continue
                    got[f.name] = {"report": json.loads(meta["report"]), "records": json.loads(meta["records"])}
                    out.write_text(json.dumps(got, indent=1) + "\n")
        elif seen_dir:
            return
        time.sleep(interval)


def fit_exponent(rows: dict[str, dict]) -> float:
    """Least-squares slope of log(solve seconds) on log(m n^2 + n^3) over every linear of every row."""
    xs, ys = [], []
    for r in rows.values():
        for v in r["layers"].values():
            m, n = v["shape"]
            if v["seconds"] > 0:
                xs.append(math.log(m * n * n + n ** 3))
                ys.append(math.log(v["seconds"]))
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def table(rows: dict[str, dict]) -> list[str]:
    lines = ["| model | parameters | quantized weights | blocks | total s | s per 1e9 quantized weights | solve | "
             "forward + Hessians | outside blocks |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        t = r["seconds"]
        weights = sum(v["shape"][0] * v["shape"][1] for v in r["layers"].values())
        lines.append(f"| {name} | {r['parameters'] / 1e6:.0f} M | {weights / 1e6:.0f} M | {r['blocks']} | {t:.0f} | "
                     f"{t / (weights / 1e9):.0f} | {r['solve_seconds']:.0f} s ({r['solve_seconds'] / t:.0%}) | "
                     f"{r['forward_seconds']:.0f} s ({r['forward_seconds'] / t:.0%}) | "
                     f"{r['outside_seconds']:.0f} s ({r['outside_seconds'] / t:.0%}) |")
    lines += ["", "Solve seconds per kind of linear (all blocks), with its shape [out, in]:", "",
              "| model | " + " | ".join(("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
              + " |", "|---|" + "---:|" * 7]
    for name, r in rows.items():
        cells = [f"{r['kinds'][k]['seconds']:.1f} {r['kinds'][k]['shape']}" if k in r["kinds"] else "-"
                 for k in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if len(rows) > 1:
        lines += ["", f"Fit over every linear: solve seconds ~ (m n^2 + n^3)^{fit_exponent(rows):.2f}."]
    lines += ["", "Commands:"] + [f"- {name}: `{r['command']}`" for name, r in rows.items()]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    r = sub.add_parser("run")
    r.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    w = sub.add_parser("watch")
    w.add_argument("work_dir", type=Path)
    w.add_argument("--out", type=Path, required=True)
    a = sub.add_parser("add")
    a.add_argument("name")
    a.add_argument("blocks", type=Path)
    a.add_argument("--seconds", type=float, required=True)
    a.add_argument("--parameters", type=int, required=True)
    a.add_argument("--command", required=True)
    args = ap.parse_args()
    if args.what == "watch":
        return watch(args.work_dir, args.out)
    rows = json.loads(RESULTS.read_text())["rows"] if RESULTS.is_file() else {}
    if args.what == "add":
        blocks = [v for _, v in sorted(json.loads(args.blocks.read_text()).items())]
        rows[args.name] = row_from_blocks(blocks, args.seconds, args.parameters, args.command)
        write_results(RESULTS, {"rows": rows}, table(rows))
        return
    for name in args.models:
        rows[name] = run_model(name)
        write_results(RESULTS, {"rows": rows}, table(rows))
        print(f"{name}: {rows[name]['seconds']:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()

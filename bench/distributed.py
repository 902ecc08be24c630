"""Calibration on 2 torch.distributed ranks against 1 process, at the same total number of cores.

    python bench/distributed.py [--model smollm2-135m] [--samples 32] [--seqlen 512]

Runs ``torchrun --nproc-per-node 2 -m lowbit quantize`` (1 thread per rank) and ``lowbit quantize
--reduction-slices 2`` (1 process, 2 threads) on the same model, recipe (GPTQ int4 g64) and
calibration windows (WikiText-2 valid), and records each one's wall time and the SHA-256 of the
checkpoint's weights and config. One process computing the same 2 slices at 1 thread
(``--reduction-slices 2``, the third row) must write the same bytes as the 2 ranks: the reduction
order is fixed by the data. More intra-op threads are another matter: torch's CPU matrix products sum
in an order that depends on the thread count, so the 2-thread row (same total cores, for the wall
time) may differ in the last bits. Rows go to
bench/results/distributed.json (.md), each written as it finishes; a finished row is kept on a rerun.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench_results import write_results

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "distributed.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    for name in ("model.safetensors", "config.json"):
        h.update((path / name).read_bytes())
    return h.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    args = parser.parse_args()
    common = [args.model, "--method", "gptq", "--bits", "4", "--group-size", "64", "--calib-samples",
              str(args.samples), "--calib-seqlen", str(args.seqlen), "--quiet", "--overwrite"]
    out_root = ROOT / "out" / "bench" / "distributed"
    runs = {
        "2 ranks x 1 thread (torchrun)": ({"OMP_NUM_THREADS": "1"},
                                          [str(Path(sys.executable).parent / "torchrun"), "--nproc-per-node", "2",
                                           "--master-port", "29561", "-m", "lowbit", "quantize"]),
        "1 process x 2 threads (--reduction-slices 2)": ({"OMP_NUM_THREADS": "2"},
                                                         [sys.executable, "-m", "lowbit", "quantize",
                                                          "--reduction-slices", "2"]),
        "1 process x 1 thread (--reduction-slices 2)": ({"OMP_NUM_THREADS": "1"},
                                                        [sys.executable, "-m", "lowbit", "quantize",
                                                         "--reduction-slices", "2"]),
    }
    rows = json.loads(RESULTS.read_text())["rows"] if RESULTS.is_file() else []
    for i, (name, (env, command)) in enumerate(runs.items()):
        key = {"model": args.model, "samples": args.samples, "seqlen": args.seqlen, "run": name}
        if any(all(r.get(k) == v for k, v in key.items()) for r in rows):
            continue
        out = out_root / f"{args.model}-{i}"
        start = time.perf_counter()
        subprocess.run([*command, *common, "-o", str(out)], check=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT), **env})
        rows.append({**key, "seconds": round(time.perf_counter() - start, 1), "sha256": _sha256(out)})
        mine = {r["run"]: r["sha256"] for r in rows if r["model"] == args.model and r["samples"] == args.samples
                and r["seqlen"] == args.seqlen}
        ranks = mine.get(next(iter(runs)))
        table = ["| model | windows | run | seconds | weights+config SHA-256 | same bytes as 2 ranks |",
                 "|---|---|---|---|---|---|"]
        table += [f"| {r['model']} | {r['samples']} x {r['seqlen']} | {r['run']} | {r['seconds']} | {r['sha256'][:16]} | "
                  f"{'-' if ranks is None else r['sha256'] == ranks} |" for r in rows]
        write_results(RESULTS, {"rows": rows}, table)
        print(name, rows[-1]["seconds"], "s", rows[-1]["sha256"][:16], flush=True)


if __name__ == "__main__":
    main()

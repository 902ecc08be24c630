"""Resident memory through the block-by-block pipeline, phase by phase (a diagnostic, not a table).

Quantizes ``--model`` with GPTQ (``--bits``/``--group-size``, asymmetric, ``--observer``) on the
benchmark's calibration windows and prints the process's RSS and peak RSS (``VmHWM``) after
imports, after loading, after capturing block 0's inputs and after every statistics pass,
solve and block forward. Run it alone: pages of the checkpoint that another process has mapped
and read are shared, and the kernel does not page shared pages out.

    python bench/pipeline_memory.py --model smollm2-135m --samples 128 --batch-size 4
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--bits", default="4")
    ap.add_argument("--group-size", default="64")
    ap.add_argument("--observer", default="minmax")
    args = ap.parse_args()

    from safetensors.torch import load_file

    from lowbit.api import load
    from lowbit.cli import build_parser, recipe_from_args
    from lowbit.evaluate.speed import peak_rss_bytes, process_rss_bytes
    from lowbit.pipeline import sequential

    def log(what: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} RSS {process_rss_bytes() / 2**20:6.0f} MiB  "
              f"peak {peak_rss_bytes() / 2**20:6.0f} MiB  {what}", flush=True)

    def traced(fn):
        def call(*a, **k):
            result = fn(*a, **k)
            log(f"after {fn.__name__}")
            return result
        return call

    for name in ("capture_block_inputs", "collect_block_statistics", "run_block", "_quantize_with_statistics"):
        setattr(sequential, name, traced(getattr(sequential, name)))
    log("imports")
    model, _ = load(args.model)
    log("loaded")
    calib_path = ROOT / "out" / "bench" / Path(args.model).name / f"calib-{args.samples}x512.safetensors"
    if not calib_path.is_file():
        raise SystemExit(f"no {calib_path}: run bench/weight_methods.py --model {args.model} once to make it")
    calib = load_file(calib_path)["input_ids"]
    flags = ["quantize", args.model, "-o", "unused", "--method", "gptq", "--bits", args.bits,
             "--group-size", args.group_size, "--asym", "--observer", args.observer, "--quiet"]
    recipe = recipe_from_args(build_parser().parse_args(flags))
    report = sequential.quantize_sequential(model, recipe, calib, batch_size=args.batch_size, progress=False)
    log(f"done in {report.seconds:.0f} s")


if __name__ == "__main__":
    main()

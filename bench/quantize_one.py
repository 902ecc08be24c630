"""One quantization, in its own process, for the benchmark tables: the CLI's quantize on fixed
calibration token ids, plus a ``bench_run.json`` with its quantize time and the process's peak RSS.

Run: ``python bench/quantize_one.py MODEL -o DIR --method M --calib-ids FILE.safetensors [scheme flags]``
(the scheme flags of ``lowbit quantize``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file


def main() -> None:
    from lowbit.api import load, needs_calibration, quantize
    from lowbit.cli import build_parser, recipe_from_args
    from lowbit.evaluate.speed import peak_rss_bytes, process_rss_bytes
    from lowbit.io.checkpoint import save_quantized

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--calib-ids", required=True)
    own, rest = ap.parse_known_args()
    args = build_parser().parse_args(["quantize", *rest, "--quiet"])
    recipe = recipe_from_args(args)
    rss_imported = process_rss_bytes()
    model, tokenizer = load(args.model)
    rss_loaded = process_rss_bytes()
    calibration = load_file(own.calib_ids)["input_ids"] if needs_calibration(recipe) else None
    report = quantize(model, recipe, calibration=calibration, progress=False)
    peak = peak_rss_bytes()  # through load, calibration and quantization, as the peers report it
    provenance = None if calibration is None else {"path": own.calib_ids, "samples": calibration.shape[0],
                                                   "seqlen": calibration.shape[1]}
    save_quantized(model, args.output, recipe=recipe, tokenizer=tokenizer, overwrite=args.overwrite,
                   calibration=provenance)
    record = {"quantize_seconds": report.seconds, "peak_rss_bytes": peak,
              "rss_after_imports_bytes": rss_imported, "rss_after_load_bytes": rss_loaded, "threads": torch.get_num_threads(),
              "fisher_seconds": report.fisher_seconds or None, "fisher_windows": report.fisher_windows or None,
              "warnings": sorted(set(getattr(report, "warnings", [])))}
    (Path(args.output) / "bench_run.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record), file=sys.stderr)


if __name__ == "__main__":
    main()

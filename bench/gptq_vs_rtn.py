"""GPTQ on SmolLM2-135M at the settings where RTN hurts most; compare with bench/rtn_table.py rows.

Protocol of the foundation issue (WikiText-2 raw test, 64 windows of 512 tokens, KL vs the float
model); calibration: 128 windows of 512 tokens of WikiText-2 valid, seed 0, damp 0.01.
Run: ``python bench/gptq_vs_rtn.py`` (about 15 min on 2 cores). Writes bench/results/gptq_<model>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lowbit.api import load, quantize
from lowbit.evaluate.perplexity import evaluate_models
from lowbit.evaluate.size import size_report
from lowbit.evaluate.text import default_eval_path, read_text, token_windows
from lowbit.methods.gptq import GPTQConfig
from lowbit.pipeline.calibration import calibration_windows
from lowbit.pipeline.recipe import Recipe
from lowbit.scheme import QuantScheme
from lowbit.sources import needs_bos

SCHEMES = [
    ("gptq int4 per-channel", QuantScheme(bits=4, granularity="channel")),
    ("gptq int3 g64 asym", QuantScheme(bits=3, group_size=64, symmetric=False)),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--act-order", action="store_true")
    args = ap.parse_args()
    reference, tokenizer = load(args.model)
    windows = token_windows(read_text(default_eval_path()), tokenizer, 512, 64)
    calib = calibration_windows(tokenizer, samples=128, seqlen=512, seed=0)
    models, rows = [], []
    for label, scheme in SCHEMES:
        model, _ = load(args.model)
        report = quantize(model, Recipe(method="gptq", default=scheme), calibration=calib,
                          gptq=GPTQConfig(act_order=args.act_order), progress=False)
        rows.append({"label": label, "bpw": size_report(model).bpw, "quantize_seconds": report.seconds,
                     "warnings": report.warnings})
        print(rows[-1], file=sys.stderr)
        models.append(model)
    bos_id = tokenizer.bos_token_id if needs_bos(tokenizer) else None
    for row, result in zip(rows, evaluate_models(models, windows, bos_id=bos_id, reference=reference)):
        row.update(result.to_dict())
        print(json.dumps(row))
    out = Path(__file__).resolve().parent / "results" / f"gptq_{Path(args.model).name}.json"
    out.write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""RTN across formats and granularities on a real model: ppl, KL and top-1 vs the float model.

Protocol (../shared/data/README.md): WikiText-2 raw test, windows of 512 tokens, the first 64,
KL(float || quantized) over the same predicted positions. Writes JSON and a Markdown table to
bench/results/. Run: ``python bench/rtn_table.py [--model smollm2-135m] [--windows 64]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from lowbit.api import load, quantize
from lowbit.evaluate.perplexity import evaluate_models, evaluate_windows
from lowbit.evaluate.size import size_report
from lowbit.evaluate.text import default_eval_path, read_text, token_windows
from lowbit.pipeline.recipe import Recipe
from lowbit.scheme import QuantScheme
from lowbit.sources import needs_bos

RESULTS = Path(__file__).resolve().parent / "results"

# (label, scheme). The int4 g32 float-minimum row re-hits SmolLM2's Q4_1 source grid (groups of 32,
# float scale and minimum): its near-zero loss is an artifact of the demo model, not a result.
SCHEMES = [
    ("int8 per-channel", QuantScheme(bits=8, granularity="channel")),
    ("fp8 e4m3 per-channel", QuantScheme(format="fp8_e4m3", bits=8, granularity="channel")),
    ("int4 per-channel", QuantScheme(bits=4, granularity="channel")),
    ("int4 g64 sym", QuantScheme(bits=4, group_size=64)),
    ("int4 g64 asym", QuantScheme(bits=4, group_size=64, symmetric=False)),
    ("int4 g32 asym", QuantScheme(bits=4, group_size=32, symmetric=False)),
    ("int4 g32 asym float-min (Q4_1 grid: ARTIFACT on this model)",
     QuantScheme(bits=4, group_size=32, symmetric=False, zero_point="float")),
    ("int3 g64 asym", QuantScheme(bits=3, group_size=64, symmetric=False)),
    ("int2 g32 asym", QuantScheme(bits=2, group_size=32, symmetric=False)),
    ("nf4 g64", QuantScheme(format="nf4", group_size=64)),
    ("nf4 g64 + double quant", QuantScheme(format="nf4", group_size=64, double_quant=True)),
    ("fp4 g64", QuantScheme(format="fp4", group_size=64)),
    ("int4 per-channel mse", QuantScheme(bits=4, granularity="channel", observer="mse")),
    ("int3 g64 asym mse", QuantScheme(bits=3, group_size=64, symmetric=False, observer="mse")),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--only", help="comma-separated substrings of scheme labels to run")
    args = ap.parse_args()
    torch.manual_seed(0)
    reference, tokenizer = load(args.model)
    windows = token_windows(read_text(default_eval_path()), tokenizer, args.seqlen, args.windows)
    bos_id = tokenizer.bos_token_id if needs_bos(tokenizer) else None
    base = evaluate_windows(reference, windows, bos_id=bos_id)
    rows = [{"label": "float32 (reference)", "bpw": 32.0, **base.to_dict(), "quantize_seconds": 0.0}]
    chosen = [(label, s) for label, s in SCHEMES if not args.only or any(k in label for k in args.only.split(","))]
    models, quantized = [], []
    for label, scheme in chosen:
        model, _ = load(args.model)
        report = quantize(model, Recipe(default=scheme), progress=False)
        size = size_report(model)
        models.append(model)
        quantized.append({"label": label, "scheme": scheme.to_dict(), "bpw": size.bpw, "size_bytes": size.size_bytes,
                          "quantize_seconds": report.seconds})
    # One reference forward per window serves every scheme.
    for info, result in zip(quantized, evaluate_models(models, windows, bos_id=bos_id, reference=reference)):
        rows.append({**info, **result.to_dict()})
    name = Path(args.model).name.replace(".gguf", "")
    meta = {"model": args.model, "seqlen": args.seqlen, "windows": args.windows, "torch": torch.__version__,
            "machine": platform.machine(), "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"),
            "command": " ".join(sys.argv)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"rtn_{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    table = "\n".join(["| scheme | bpw | ppl | KL | top-1 |", "|---|---:|---:|---:|---:|"] + [_row(r) for r in rows])
    (RESULTS / f"rtn_{name}.md").write_text(f"{meta}\n\n{table}\n")
    print(table)


def _row(r: dict) -> str:
    kld = "" if r.get("kld") is None else f"{r['kld']:.4f}"
    top1 = "" if r.get("top1") is None else f"{r['top1']:.3f}"
    return f"| {r['label']} | {r['bpw']:.3f} | {r['ppl']:.3f} | {kld} | {top1} |"


if __name__ == "__main__":
    main()

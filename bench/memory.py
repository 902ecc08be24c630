"""Resident memory of a model in the process, measured (VmRSS), not computed from tensor sizes.

Each configuration loads in a fresh subprocess so nothing is shared or cached between them:
RSS after `import torch, lowbit` is subtracted from RSS after loading (model + tokenizer), and again
after one 512-token forward pass (which adds activations and what the allocator keeps of them).
Run: ``python bench/memory.py [--model smollm2-135m]`` (quantizes into out/memory-* first).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import gc, json, sys, torch, transformers
import lowbit
from lowbit.evaluate.speed import process_rss_bytes
from lowbit.nn import quantized_layers
gc.collect(); base = process_rss_bytes()
model, _ = lowbit.load(sys.argv[1])
gc.collect()
loaded = process_rss_bytes()
with torch.inference_mode():
    model(torch.arange(512)[None])
gc.collect()
after_forward = process_rss_bytes()
linear = sum(t.numel() * t.element_size() for m in quantized_layers(model).values() for t in m.state_dict().values())
float_linear = sum(m.weight.numel() * 4 for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and n != "lm_head")
print(json.dumps({"rss_model_bytes": loaded - base, "rss_after_forward_bytes": after_forward - base,
                  "quantized_linear_bytes": linear,
                  "float_linear_bytes": float_linear}))
"""

SCHEMES = {
    "int4 g64 asym": ["--bits", "4", "--group-size", "64", "--asym"],
    "nf4 g64 dq": ["--format", "nf4", "--group-size", "64", "--double-quant"],
    "int8 per-channel": ["--bits", "8", "--per-channel"],
}


def measure(source: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, source], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    args = ap.parse_args()
    rows = {"float32": measure(args.model)}
    for label, flags in SCHEMES.items():
        out = Path("out") / ("memory-" + label.replace(" ", "-"))
        subprocess.run([sys.executable, "-m", "lowbit", "quantize", args.model, "-o", str(out), "--overwrite",
                        "--quiet", *flags], check=True)
        rows[label] = measure(str(out))
    ref = rows["float32"]["rss_model_bytes"]
    print("| model | RSS after load | vs float32 | RSS after a forward | quantized linears |")
    print("|---|---:|---:|---:|---:|")
    for label, r in rows.items():
        print(f"| {label} | {r['rss_model_bytes'] / 2**20:.0f} MiB | {r['rss_model_bytes'] / ref:.2f} | "
              f"{r['rss_after_forward_bytes'] / 2**20:.0f} MiB | {r['quantized_linear_bytes'] / 2**20:.1f} MiB |")
    results = Path(__file__).resolve().parent / "results"
    results.mkdir(exist_ok=True)
    (results / "memory.json").write_text(json.dumps({"model": args.model, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()

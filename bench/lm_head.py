"""What quantizing the LM head (and the embedding tied to it) costs in quality.

The body is fixed (RTN, ``--body`` scheme); the head varies: float32 (the default recipe's skip),
int8 per channel, int8 groups of 64, int4 groups of 64 (asymmetric) and nf4 groups of 64. For a model
with tied embeddings the embedding reads the head's codes (``QuantEmbedding``), so its rows are
quantized too. Same windows, same float reference for every row; rows are written as they finish.

    python bench/lm_head.py --model smollm2-135m --windows 16
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_setup import ROOT, bench_setup  # noqa: E402

HEADS = {
    "float32": None,
    "int8 per-channel": {"bits": 8, "granularity": "channel"},
    "int8 g64": {"bits": 8, "group_size": 64},
    "int4 g64 asym": {"bits": 4, "group_size": 64, "symmetric": False},
    "nf4 g64": {"format": "nf4", "group_size": 64},
}
BODY = {"bits": 4, "group_size": 64, "symmetric": False}


def main() -> None:
    from lowbit.api import load, quantize
    from lowbit.evaluate.perplexity import evaluate_windows
    from lowbit.nn import QuantEmbedding, QuantLinear
    from lowbit.pipeline.recipe import Override, Recipe
    from lowbit.scheme import QuantScheme

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--heads", help="comma-separated head rows (default: all)")
    args = p.parse_args()
    setup = bench_setup("bench/lm_head.py", args.model, calib_samples=128, n_windows=args.windows)
    out = ROOT / "bench" / "results" / f"lm_head_{setup.name}.json"
    rows = []
    for head_name in (args.heads.split(",") if args.heads else HEADS):
        head = HEADS[head_name]
        model, _ = load(args.model)
        recipe = Recipe(default=QuantScheme(**BODY), skip=() if head else ("lm_head",),
                        overrides=(Override(r"^lm_head$", QuantScheme(**head)),) if head else ())
        quantize(model, recipe, progress=False)
        tied = isinstance(model.get_input_embeddings(), QuantEmbedding)  # quantize ties a tied head's embedding
        result = evaluate_windows(model, setup.windows, bos_id=setup.bos_id, reference=setup.reference,
                                  progress=False)
        head_module = model.get_output_embeddings()
        bpw = head_module.quantized_weight().bits_per_weight if isinstance(head_module, QuantLinear) else 32.0
        rows.append({"head": head_name, "embedding": "tied to the head's codes" if tied else "float32",
                     "head_bpw": bpw, "ppl": result.ppl, "kl": result.kld, "top1": result.top1})
        print(json.dumps(rows[-1]), flush=True)
        out.write_text(json.dumps({**setup.meta, "body": QuantScheme(**BODY).describe(), "rows": rows}, indent=2))
        del model
    lines = [f"`{setup.meta['command']}`; body {QuantScheme(**BODY).describe()} RTN, {args.windows} x 512 windows", "",
             "| LM head | embedding | head bits/weight | ppl | KL | top-1 |", "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['head']} | {r['embedding']} | {r['head_bpw']:.3f} | {r['ppl']:.3f} | {r['kl']:.4f} | "
              f"{r['top1']:.3f} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

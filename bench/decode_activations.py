"""What rounding x in the decode products costs: KL of the int8 / int16 activation options against
the exact kernels, on the same quantized model.

In generation the rounded-activation kernels run only in products of fewer than ``GEMM_MIN_ROWS``
rows (decode); prefill dequantizes exact weights into a GEMM. To measure their arithmetic on whole
evaluation windows, this bench raises ``GEMM_MIN_ROWS`` above the window length, so every product
of the window runs the decode kernel, and compares the logits with the same model on the exact
(float32-activation) kernels: KL(exact || rounded) per token, perplexity of both. The issue's bar
for a default is a KL of at most 0.001.

    python bench/decode_activations.py --model smollm2-135m --windows 16
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_results import write_results  # noqa: E402
from bench_setup import ROOT, bench_setup  # noqa: E402

BODIES = {
    "int4 g64 asym": {"bits": 4, "group_size": 64, "symmetric": False},
    "int8 per-channel": {"bits": 8, "granularity": "channel"},
    "int3 g64 asym": {"bits": 3, "group_size": 64, "symmetric": False},
}
HEAD = {"bits": 8, "granularity": "channel"}


def main() -> None:
    import lowbit.kernels.cpu as cpu
    from lowbit.api import load, quantize
    from lowbit.evaluate.perplexity import evaluate_models
    from lowbit.nn import prepare_kernels
    from lowbit.pipeline.recipe import Override, Recipe
    from lowbit.scheme import QuantScheme

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--windows", type=int, default=16)
    args = p.parse_args()
    setup = bench_setup("bench/decode_activations.py", args.model, calib_samples=128, n_windows=args.windows)
    out = ROOT / "bench" / "results" / f"decode_activations_{setup.name}.json"
    cpu.GEMM_MIN_ROWS = setup.windows.shape[1] + 2  # every product through the decode kernels (read per call)
    rows = []
    for body_name, body in BODIES.items():
        model, _ = load(args.model)
        recipe = Recipe(default=QuantScheme(**body), skip=(), overrides=(Override(r"^lm_head$", QuantScheme(**HEAD)),))
        quantize(model, recipe, progress=False)
        prepare_kernels(model)  # the exact kernels: the reference of this table
        variants = {}
        for activations in ("int8", "int16"):
            variant = copy.deepcopy(model)
            chosen = prepare_kernels(variant, activations=activations)
            variants[activations] = (variant, sorted(chosen))
        results = evaluate_models([v for v, _ in variants.values()], setup.windows, bos_id=setup.bos_id,
                                  reference=model, progress=False)
        exact = evaluate_models([model], setup.windows, bos_id=setup.bos_id, progress=False)[0]
        for (activations, (_, kernels)), result in zip(variants.items(), results):
            row = {"body": body_name, "head": "int8 per-channel", "activations": activations, "kernels": kernels,
                   "ppl_exact": exact.ppl, "ppl": result.ppl, "kl": result.kld, "top1": result.top1}
            rows.append(row)
            print(json.dumps(row), flush=True)
            _write(out, setup.meta, rows)


def _write(out: Path, meta: dict, rows: list[dict]) -> None:
    lines = [f"`{meta['command']}` ({meta['windows']} windows of WikiText-2 test; every product through the "
             "decode kernels; KL against the same model on the exact kernels)", "",
             "| body (head int8 per channel) | activations | ppl exact | ppl | KL | kernels |",
             "|---|---|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['body']} | {r['activations']} | {r['ppl_exact']:.3f} | {r['ppl']:.3f} | {r['kl']:.2g} | "
                     f"{', '.join(r['kernels'])} |")
    write_results(out, {**meta, "rows": rows}, lines)


if __name__ == "__main__":
    main()

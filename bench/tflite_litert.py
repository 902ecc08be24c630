"""SmolLM2 as TFLite with int8 weights (``lowbit export --to tflite``: Google's converter and its weight-only
recipe), run by the LiteRT interpreter and scored against torch float32 on the same WikiText-2 windows.

    python bench/tflite_litert.py --windows 4
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_results import write_results  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--windows", type=int, default=64)
    args = p.parse_args()

    import torch

    from bench_setup import SEQLEN, bench_setup

    import lowbit
    from lowbit.evaluate.perplexity import evaluate_models
    from lowbit.tflite import TfliteCausalLM

    torch.set_num_threads(1)
    setup = bench_setup("bench/tflite_litert.py", args.model, 128, args.windows)
    path = setup.work / f"{setup.name}-int8-weights-{SEQLEN}.tflite"
    if not path.is_file():
        lowbit.export(setup.reference, setup.tokenizer, path, to="tflite", seq_len=SEQLEN)
    lm = TfliteCausalLM(path, threads=1)
    float_row, tflite_row = evaluate_models([setup.reference, lm], setup.windows, bos_id=setup.bos_id,
                                            reference=setup.reference)
    rows = [{"row": "torch float32", **float_row.to_dict()},
            {"row": "LiteRT interpreter, int8 weights (litert-torch weight-only recipe)", **tflite_row.to_dict(),
             "file_bytes": path.stat().st_size, "weight_dtypes": lm.weight_dtypes()}]
    lines = [f"`{setup.meta['command']}`  ", "", "| model | ppl | x torch float32 | KL vs float | top-1 | file MiB |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        size = f"{r['file_bytes'] / 2**20:.1f}" if "file_bytes" in r else ""
        lines.append(f"| {r['row']} | {r['ppl']:.4f} | {r['ppl'] / rows[0]['ppl']:.4f} | {r['kld']:.5f} | "
                     f"{r['top1']:.4f} | {size} |")
    write_results(RESULTS / f"tflite_litert_{setup.name}.json", {**setup.meta, "rows": rows}, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""bitsandbytes checkpoints of SmolLM2 made by transformers on this CPU, read by lowbit (issue 21, part 5).

    python bench/bnb_import.py [--model smollm2-135m] [--kinds nf4 nf4-dq fp4 int8] [--windows 4]

For each kind, transformers quantizes the float model with ``BitsAndBytesConfig`` (bitsandbytes on CPU,
blocks of 64, float32 compute) and ``save_pretrained`` writes the checkpoint; then:

- ``lowbit.load`` reads the directory: how many linears became lowbit codes (schemes), how many were
  dequantized instead (the warning);
- each layer's weight as lowbit decodes it against bitsandbytes' own dequantization of the same
  layer in the transformers model (``dequantize_4bit`` / ``int8_vectorwise_dequant``): layers equal
  bit for bit, and the largest difference;
- perplexity on the first ``--windows`` 512-token windows of WikiText-2 raw test, same windows, same
  thread: lowbit's eval of the loaded checkpoint; the float32 model with bitsandbytes' dequantized weights
  put in (``F.linear``: what the checkpoint's weights compute exactly); and the transformers +
  bitsandbytes model itself, whose CPU kernels (4-bit: repacked on the first forward; 8-bit: LLM.int8,
  activations rounded to int8 with fp16 outliers) compute something else.

Results: bench/results/bnb_import.{json,md}, a row per kind as it finishes (a finished kind is skipped
when the settings are the same).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_results import write_results

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "bnb_import.json"
KINDS = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=False),
    "nf4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=False),
    "int8": dict(load_in_8bit=True),
}


def bnb_model(source: Path, kind: str):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(**KINDS[kind], bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(source, quantization_config=config, device_map="cpu",
                                                dtype=torch.float32).eval()


def bnb_weights(model) -> dict[str, torch.Tensor]:
    """Every bitsandbytes linear's weight as bitsandbytes dequantizes it (float32)."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    out = {}
    for name, m in model.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            out[name] = F.dequantize_4bit(m.weight.data, m.weight.quant_state).float()
        elif isinstance(m, bnb.nn.Linear8bitLt):
            out[name] = F.int8_vectorwise_dequant(m.weight.data, m.weight.SCB).float()
    return out


def ppl(model, tokenizer, windows: int) -> float:
    from lowbit.evaluate.perplexity import evaluate_windows
    from lowbit.evaluate.text import default_eval_path, read_text, token_windows

    ids = token_windows(read_text(default_eval_path()), tokenizer, 512, windows)
    return evaluate_windows(model, ids, bos_id=None, progress=False).ppl


def float_model(source: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()


def run_kind(source: Path, kind: str, work: Path, windows: int) -> dict:
    from lowbit.api import load
    from lowbit.nn import prepare_kernels, quantized_layers

    from transformers import AutoTokenizer

    model = bnb_model(source, kind)
    directory = work / f"{source.parent.name}-bnb-{kind}"
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(source).save_pretrained(directory)
    reference = bnb_weights(model)  # before any forward: bitsandbytes repacks 4-bit weights for CPU on the first
    exact = float_model(source)
    for name, weight in reference.items():
        exact.get_submodule(name).weight.data = weight
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded, tokenizer = load(str(directory))
    seconds = time.perf_counter() - start
    notes = [str(w.message) for w in caught if "bitsandbytes layers" in str(w.message)]
    layers = quantized_layers(loaded)
    same, worst = 0, 0.0
    for name, want in reference.items():
        got = (layers[name].quantized_weight().dequantize() if name in layers
               else loaded.get_submodule(name).weight.detach().float())
        same += bool(torch.equal(got, want))
        worst = max(worst, float((got - want).abs().max()))
    schemes = sorted({layer.quantized_weight().scheme.describe() for layer in layers.values()})
    prepare_kernels(loaded, activations="float32")
    row = {"kind": kind, "bnb_layers": len(reference), "as_codes": len(layers), "schemes": schemes,
           "notes": notes, "bit_identical_layers": same, "max_abs_diff": worst, "load_seconds": round(seconds, 1),
           "lowbit_ppl": ppl(loaded, tokenizer, windows), "dequantized_ppl": ppl(exact, tokenizer, windows),
           "bnb_ppl": ppl(model, tokenizer, windows)}
    return row


def table(rows: list[dict], windows: int, version: str) -> list[str]:
    lines = [f"bitsandbytes {version} checkpoints of SmolLM2-135M made by transformers on CPU, read by lowbit; "
             f"perplexity on the first {windows} windows of 512 tokens of WikiText-2 raw test, 1 thread.", "",
             "| kind | layers as lowbit codes | scheme | weights bit-identical to bitsandbytes' dequantization "
             "| max abs diff | lowbit ppl | float32 + bitsandbytes' dequantized weights ppl | ratio "
             "| transformers + bitsandbytes kernels ppl |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['kind']} | {r['as_codes']}/{r['bnb_layers']} | {', '.join(r['schemes']) or '-'} "
                     f"| {r['bit_identical_layers']}/{r['bnb_layers']} | {r['max_abs_diff']:.3g} "
                     f"| {r['lowbit_ppl']:.4f} | {r['dequantized_ppl']:.4f} | {r['lowbit_ppl'] / r['dequantized_ppl']:.6f} "
                     f"| {r['bnb_ppl']:.4f} |")
    notes = [f"- {r['kind']}: {n.replace(str(ROOT) + '/', '')}" for r in rows for n in r["notes"]]
    return lines + ([""] + notes if notes else [])


def main() -> int:
    import bitsandbytes

    from lowbit.sources import pull

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--work", type=Path, default=ROOT / "out" / "bnb_import")
    args = p.parse_args()
    torch.set_num_threads(1)
    source = pull(args.model)
    settings = {"model": args.model, "windows": args.windows, "bitsandbytes": bitsandbytes.__version__}
    previous = json.loads(OUT.read_text()) if OUT.exists() else {}
    rows = [r for r in previous.get("rows", []) if previous.get("settings") == settings and r["kind"] in args.kinds]
    for kind in args.kinds:
        if any(r["kind"] == kind for r in rows):
            continue
        rows.append(run_kind(source, kind, args.work, args.windows))
        rows.sort(key=lambda r: args.kinds.index(r["kind"]))
        write_results(OUT, {"settings": settings, "rows": rows}, table(rows, args.windows, bitsandbytes.__version__))
        print(json.dumps(rows[-1]), flush=True)
    print("\n".join(table(rows, args.windows, bitsandbytes.__version__)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

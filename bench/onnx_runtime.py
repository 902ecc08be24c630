"""lowbit's ONNX export scored and timed by onnxruntime on CPU, beside lowbit's own evaluation of the same
weights, onnxruntime-genai's model builder (the peer) and the decode rows of bench/decode_speed.py.

Quality (the README protocol: WikiText-2 raw test, the first 64 windows of 512 tokens, KL against the float
model, all models in one pass): SmolLM2 quantized by lowbit (RTN int4 g64 asym, the tied LM head too), then
exported with ``lowbit export --to onnx`` at ``accuracy_level`` 0 (float32 products) and 4 (int8
activations), each scored by onnxruntime; the peer is ``python -m onnxruntime_genai.models.builder`` from
the float HF directory, int4 g64 asym (``is_symmetric=false``, its own RTN), accuracy_level 4, scored by
the same runner (``lowbit.onnx.runtime.OnnxCausalLM``: plain onnxruntime, same windows).

Speed (``--speed``): every row in a fresh process, one thread, the same fixed-seed random prompt of
``--prompt-tokens`` ids and ``--new-tokens`` greedy tokens, best of ``--repeats`` after a warm-up; the
onnxruntime rows through ``OnnxCausalLM`` (one prefill call, then one call per token with the cache),
the torch / lowbit / llama.cpp rows by ``bench/decode_speed.py --one``.

    python bench/onnx_runtime.py                # quality rows, written as they finish (--resume keeps them)
    python bench/onnx_runtime.py --speed        # decode rows
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_results import write_results  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SCHEME = {"bits": 4, "group_size": 64, "symmetric": False}
LEVELS = (0, 4)
PEER_OPTIONS = ["block_size=64", "is_symmetric=false", "accuracy_level=4", "hf_token=false",
                "shared_embeddings=false"]  # shared (tied int4) embeddings build a graph onnxruntime 1.32 rejects
# decode_speed.py rows run beside the onnxruntime ones
DECODE_ROWS = ("torch float32", "lowbit int4 g64 asym (head int4 g64)", "llama.cpp Q4_0")


def onnx_dir(work: Path, level: int) -> Path:
    return work / f"onnx-int4-g64-asym-level{level}"


def peer_dir(work: Path) -> Path:
    return work / "ort-genai-int4-g64-asym"


def prepare(model_name: str, work: Path) -> None:
    """lowbit's exports at each accuracy level and the peer's model, made once and reused."""
    import lowbit

    todo = [level for level in LEVELS if not onnx_dir(work, level).is_dir()]
    if todo:
        model, tokenizer = lowbit.load(model_name)
        lowbit.quantize(model, quantized_recipe(), progress=False)
        for level in todo:
            lowbit.export(model, tokenizer, onnx_dir(work, level), to="onnx", accuracy_level=level)
    if not peer_dir(work).is_dir():
        from lowbit.sources import pull

        float_dir = pull(model_name, progress=False)
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(float_dir), "-o",
                        str(peer_dir(work)), "-p", "int4", "-e", "cpu", "-c", str(work / "ort-genai-cache"),
                        "--extra_options", *PEER_OPTIONS], check=True, stdout=subprocess.DEVNULL)


def quantized_recipe():
    import lowbit

    scheme = lowbit.QuantScheme(**SCHEME)
    return lowbit.Recipe(default=scheme, skip=(), overrides=(lowbit.Override(r"^lm_head$", scheme),))


def quality(args: argparse.Namespace) -> None:
    import torch

    from bench_setup import bench_setup

    import lowbit
    from lowbit.evaluate.perplexity import evaluate_models
    from lowbit.onnx.runtime import OnnxCausalLM

    torch.set_num_threads(1)
    setup = bench_setup("bench/onnx_runtime.py", args.model, 128, args.windows)
    prepare(args.model, setup.work)
    quantized, _ = lowbit.load(args.model)
    lowbit.quantize(quantized, quantized_recipe(), progress=False)
    models = {"float32 (torch)": setup.reference, "lowbit int4 g64 asym (lowbit eval, torch)": quantized}
    for level in LEVELS:
        models[f"lowbit int4 g64 asym -> onnx, accuracy_level {level}"] = OnnxCausalLM(onnx_dir(setup.work, level))
    models["onnxruntime-genai builder int4 g64 asym, accuracy_level 4"] = OnnxCausalLM(peer_dir(setup.work))
    first = setup.windows[:1]
    with torch.no_grad():
        lowbit_logits = quantized(first).logits
        gaps = {name: float((_logits(m, first) - lowbit_logits).abs().max()) for name, m in models.items()}
    results = evaluate_models(list(models.values()), setup.windows, bos_id=setup.bos_id, reference=setup.reference)
    rows = [{"row": name, **r.to_dict(), "max_abs_logit_gap_to_lowbit_window0": gaps[name]}
            for name, r in zip(models, results)]
    out = RESULTS / f"onnx_runtime_{setup.name}.json"
    base = rows[1]["ppl"]
    lines = [f"`{setup.meta['command']}`  ", "",
             "| model | ppl | x lowbit eval | KL vs float | top-1 | max abs logit gap to lowbit (window 0) |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['row']} | {r['ppl']:.4f} | {r['ppl'] / base:.4f} | {r['kld']:.5f} | {r['top1']:.4f} | "
                     f"{r['max_abs_logit_gap_to_lowbit_window0']:.2e} |")
    write_results(out, {**setup.meta, "rows": rows}, lines)
    print("\n".join(lines))


def _logits(model, ids):
    """Logits of a torch model (its output's ``.logits``) or of a runner returning them."""
    out = model(ids)
    return getattr(out, "logits", out)


def speed_row(row: str, work: Path, prompt_tokens: int, new_tokens: int, repeats: int) -> dict:
    """One onnxruntime row, in this process: prefill and decode tokens/s, best of ``repeats``."""
    import numpy as np
    import torch

    from lowbit.evaluate.speed import peak_rss_bytes
    from lowbit.onnx.runtime import OnnxCausalLM

    path = peer_dir(work) if row.startswith("onnxruntime-genai") else onnx_dir(work, int(row[-1]))
    lm = OnnxCausalLM(path, threads=1)
    vocab = lm.step(np.zeros((1, 1), dtype=np.int64), lm.empty_cache(1))[0].shape[-1]
    ids = torch.randint(0, vocab, (1, prompt_tokens), generator=torch.Generator().manual_seed(0)).numpy()
    prefill, decode = [], []
    for i in range(repeats + 1):
        start = time.perf_counter()
        logits, past = lm.step(ids, lm.empty_cache(1))
        token = int(logits[0, -1].argmax())
        middle = time.perf_counter()
        for _ in range(new_tokens - 1):
            logits, past = lm.step(np.array([[token]]), past)
            token = int(logits[0, -1].argmax())
        end = time.perf_counter()
        if i:  # the first run is the warm-up
            prefill.append(prompt_tokens / (middle - start))
            decode.append((new_tokens - 1) / (end - middle))
    import onnxruntime

    return {"prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "prefill_tokens_per_second": max(prefill),
            "decode_tokens_per_second": max(decode), "threads": 1, "peak_rss_mib": peak_rss_bytes() / 2**20,
            "loop": "onnxruntime", "onnxruntime": onnxruntime.__version__}


ONNX_ROWS = tuple(f"lowbit int4 g64 asym -> onnx, accuracy_level {level}" for level in LEVELS) + (
    "onnxruntime-genai builder int4 g64 asym, accuracy_level 4",)


def speed(args: argparse.Namespace) -> None:
    prepare(args.model, ROOT / "out" / "bench" / args.model)
    out = RESULTS / f"onnx_runtime_speed_{args.model}.json"
    previous = json.loads(out.read_text()) if args.resume and out.exists() else {}
    rows = previous.get("rows", [])
    done = {r["row"] for r in rows}
    command = " ".join(["python", "bench/onnx_runtime.py", *sys.argv[1:]])
    common = ["--model", args.model, "--threads", "1", "--prompt-tokens", str(args.prompt_tokens),
              "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats)]
    for row in (*ONNX_ROWS, *DECODE_ROWS):
        if row in done:
            continue
        script = __file__ if row in ONNX_ROWS else str(ROOT / "bench" / "decode_speed.py")
        proc = subprocess.run([sys.executable, script, "--one", row, *common], capture_output=True, text=True)
        if proc.returncode:
            print(f"{row} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append({"row": row, **json.loads(proc.stdout.strip().splitlines()[-1])})
        print(f"{row:60s} prefill {rows[-1]['prefill_tokens_per_second']:7.1f}  "
              f"decode {rows[-1]['decode_tokens_per_second']:7.1f} tok/s", flush=True)
        _write_speed(out, rows, [*previous.get("commands", []), command])


def _write_speed(out: Path, rows: list[dict], commands: list[str]) -> None:
    by_name = {r["row"]: r for r in rows}
    fp32, q4 = by_name.get("torch float32"), by_name.get("llama.cpp Q4_0")
    lines = [*(f"`{c}`  " for c in commands), "",
             "| model | runtime | decode tok/s | x torch fp32 | x llama.cpp Q4_0 | prefill tok/s | peak RSS MiB |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        ratio = (lambda b: f"{r['decode_tokens_per_second'] / b['decode_tokens_per_second']:.2f}" if b else "")
        lines.append(f"| {r['row']} | {r.get('loop', 'llama.cpp')} | {r['decode_tokens_per_second']:.1f} | "
                     f"{ratio(fp32)} | {ratio(q4)} | {r['prefill_tokens_per_second']:.1f} | {r['peak_rss_mib']:.0f} |")
    write_results(out, {"commands": commands, "rows": rows}, lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--windows", type=int, default=64)
    p.add_argument("--speed", action="store_true", help="the decode rows instead of the quality rows")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", default="1", help=argparse.SUPPRESS)  # decode_speed.py's flag, passed through
    p.add_argument("--resume", action="store_true", help="keep speed rows already in the results file")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        work = ROOT / "out" / "bench" / args.model
        print(json.dumps(speed_row(args.one, work, args.prompt_tokens, args.new_tokens, args.repeats)))
    elif args.speed:
        speed(args)
    else:
        quality(args)


if __name__ == "__main__":
    main()

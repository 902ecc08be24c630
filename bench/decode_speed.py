"""Decode and prefill speed of lowbit's quantized models beside torch's float model and llama.cpp.

Every row runs in a fresh process (``--one ROW``) on the same fixed-seed random prompt, with the same
thread count, through ``lowbit.evaluate.generate`` (one prefill forward, then one forward per token):
the lean loop where the model allows it (Llama family), else transformers' forward over a
``DynamicCache``; rows marked "transformers loop" force the latter. Ratios are to the "torch float32"
row, which runs the same loop as the unmarked rows. llama.cpp rows run the same token counts through
llama-cpp-python (``Llama.eval`` of the prompt, then one token at a time).
Each row reports the fastest of ``--repeats`` runs after a warm-up, and the ratios to the float32
row of the same thread count. Rows are written as they finish; ``--resume`` keeps finished rows.

    python bench/decode_speed.py --model smollm2-135m --threads 1,2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_results import write_results  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

# row -> (kind, settings): torch dtype, a lowbit scheme (weights, LM head), or a GGUF type; the decode
# loop ("lean" where the model allows, else transformers'; or "transformers") and, for lowbit, the
# activation precision of the decode products ("auto", lowbit's default, unless named: int16 where the
# kernel can, float32 elsewhere; the kernels column says which each layer got).
INT4 = {"bits": 4, "group_size": 64, "symmetric": False}
INT8_HEAD = {"bits": 8, "granularity": "channel"}
ROWS: dict[str, tuple[str, dict]] = {
    "torch float32": ("torch", {"dtype": "float32"}),
    "torch float32 (transformers loop)": ("torch", {"dtype": "float32", "loop": "transformers"}),
    "torch float32 (huge pages)": ("torch", {"dtype": "float32", "huge_pages": True}),
    "torch bfloat16 (transformers loop)": ("torch", {"dtype": "bfloat16", "loop": "transformers"}),
    "lowbit int4 g64 asym (head int8)": ("lowbit", {"scheme": INT4, "head": INT8_HEAD}),
    "lowbit int4 g64 asym (head int8, int8 activations)": ("lowbit", {"scheme": INT4, "head": INT8_HEAD,
                                                                      "activations": "int8"}),
    "lowbit int4 g64 asym (head int8, float32 activations)": ("lowbit", {"scheme": INT4, "head": INT8_HEAD,
                                                                         "activations": "float32"}),
    "lowbit int4 g64 asym (head int8, 4 KiB pages)": ("lowbit", {"scheme": INT4, "head": INT8_HEAD,
                                                                 "huge_pages": False}),
    "lowbit int4 g64 asym (head int8, transformers loop)": ("lowbit", {"scheme": INT4, "head": INT8_HEAD,
                                                                       "loop": "transformers"}),
    "lowbit int4 g64 asym (head int4 g64)": ("lowbit", {"scheme": INT4, "head": INT4}),
    "lowbit nf4 g64 dq (head int8)": ("lowbit", {"scheme": {"format": "nf4", "group_size": 64, "double_quant": True},
                                                "head": INT8_HEAD}),
    "lowbit int3 g64 asym (head int8)": ("lowbit", {"scheme": {"bits": 3, "group_size": 64, "symmetric": False},
                                                   "head": INT8_HEAD}),
    "lowbit int8 per-channel (head int8)": ("lowbit", {"scheme": INT8_HEAD, "head": INT8_HEAD}),
    "lowbit int8 per-channel (head int8, int8 activations)": ("lowbit", {"scheme": INT8_HEAD, "head": INT8_HEAD,
                                                                         "activations": "int8"}),
    "lowbit int4 g64 asym (head float, reference path)": ("lowbit", {"scheme": INT4, "head": None, "kernels": False,
                                                                     "loop": "transformers"}),
    # codebook formats (issue 18), quantized by their own calibrated methods on 16 windows: speed does not
    # depend on how well the codes were fitted, the layout is what the full benchmark's models have
    "lowbit squeezellm lut3 per-row, 0.25% outliers (head int8)": (
        "lowbit", {"method": "squeezellm", "scheme": {"format": "lut", "bits": 3, "granularity": "channel"},
                   "head": INT8_HEAD, "calibration": 16, "config": {"fisher_samples": 4}}),
    "lowbit squeezellm lut4 per-row, 0.25% outliers (head int8)": (
        "lowbit", {"method": "squeezellm", "scheme": {"format": "lut", "bits": 4, "granularity": "channel"},
                   "head": INT8_HEAD, "calibration": 16, "config": {"fisher_samples": 4}}),
    "lowbit pq d4 k8 g64 (head int8)": (
        "lowbit", {"method": "pq", "scheme": {"format": "vq", "bits": 8, "vector_dim": 4, "group_size": 64,
                                              "shared_codebook": True},
                   "head": INT8_HEAD, "calibration": 16}),
    # the same layout with random codes and codebooks (no calibration: the kernels' time does not
    # depend on the values, so this row measures the pq layout in a minute rather than ten)
    "lowbit pq d4 k8 g64, random codes (head int8)": (
        "lowbit", {"random_codebook": {"format": "vq", "bits": 8, "vector_dim": 4, "group_size": 64,
                                       "shared_codebook": True}, "head": INT8_HEAD}),
    # the 2-bit rows of vq_methods.py's table: 5-bit codes for pairs (the kernel), 7-bit codes for triples (no
    # kernel covers a 3-weight code, so the reference path)
    "lowbit pq d2 k5 g64, random codes (head int8)": (
        "lowbit", {"random_codebook": {"format": "vq", "bits": 5, "vector_dim": 2, "group_size": 64,
                                       "shared_codebook": True}, "head": INT8_HEAD}),
    "lowbit pq d3 k7 g96, random codes (head int8)": (
        "lowbit", {"random_codebook": {"format": "vq", "bits": 7, "vector_dim": 3, "group_size": 96,
                                       "shared_codebook": True}, "head": INT8_HEAD}),
    "lowbit vq d4 k8 per-layer (head int8)": (
        "lowbit", {"method": "vq", "scheme": {"format": "vq", "bits": 8, "vector_dim": 4, "granularity": "tensor"},
                   "head": INT8_HEAD, "calibration": 16}),
    "llama.cpp F32": ("llama.cpp", {"type": "F32"}),
    "llama.cpp Q8_0": ("llama.cpp", {"type": "Q8_0"}),
    "llama.cpp Q4_0": ("llama.cpp", {"type": "Q4_0"}),
    "llama.cpp Q4_K_M": ("llama.cpp", {"type": "Q4_K_M"}),
}


def run_one(row: str, model_name: str, threads: int, prompt_tokens: int, new_tokens: int, repeats: int) -> dict:
    """Measure one row in this process; returns its result."""
    import torch

    torch.set_num_threads(threads)
    kind, settings = ROWS[row]
    if kind == "llama.cpp":
        return _llama_cpp_row(model_name, settings["type"], threads, prompt_tokens, new_tokens, repeats)
    from lowbit.api import load, quantize
    from lowbit.evaluate.generate import bench_speed
    from lowbit.nn import prepare_kernels
    from lowbit.pipeline.recipe import Override, Recipe
    from lowbit.scheme import QuantScheme

    if not settings.get("huge_pages", True):
        os.environ["LOWBIT_HUGE_PAGES"] = "0"  # layouts stay in torch's ordinary pages
    model, tokenizer = load(model_name)
    kernels = {}
    if kind == "torch":
        model = model.to(getattr(torch, settings["dtype"]))
        if settings.get("huge_pages"):  # the float weights in huge pages too, as lowbit's layouts are
            from lowbit.kernels.huge_pages import tensors_in_huge_pages

            params = list(model.parameters())
            copies = tensors_in_huge_pages([p.data for p in params])
            if copies is None:
                raise SystemExit("huge pages are unavailable here")
            for p, copy in zip(params, copies):
                p.data = copy
    elif "random_codebook" in settings:
        _random_codebook_layers(model, QuantScheme(**settings["random_codebook"]))
        quantize(model, Recipe(default=QuantScheme(**settings["head"]), skip=()), progress=False)
    elif "method" in settings:  # a calibrated method for the body, then the head by RTN (one method per recipe)
        from lowbit.pipeline.calibration import calibration_windows

        body = Recipe.from_dict({"method": settings["method"], "method_config": settings.get("config"),
                                 "default": settings["scheme"], "skip": ["lm_head"]})
        quantize(model, body, calibration=calibration_windows(tokenizer, samples=settings["calibration"]),
                 progress=False)
        quantize(model, Recipe(default=QuantScheme(**settings["head"]), skip=()), progress=False)
    else:
        head = settings["head"]
        recipe = Recipe(default=QuantScheme(**settings["scheme"]), skip=() if head else ("lm_head",),
                        overrides=(Override(r"^lm_head$", QuantScheme(**head)),) if head else ())
        quantize(model, recipe, progress=False)  # a quantized tied head keeps the embedding tied to its codes
    if kind == "lowbit" and settings.get("kernels", True):
        chosen = prepare_kernels(model, activations=settings.get("activations", "auto"))
        kernels = {k: len(v) for k, v in chosen.items()}
    report = bench_speed(model.eval(), prompt_tokens=prompt_tokens, new_tokens=new_tokens, repeats=repeats,
                         loop=settings.get("loop", "auto"))
    report.pop("runs")
    return {**report, "kernels": kernels}


def _random_codebook_layers(model, scheme) -> None:
    """Every linear of the decoder blocks as a ``scheme`` (vq) layer of seeded random codes and codebooks."""
    import torch

    from lowbit.nn import QuantLinear, set_submodule
    from lowbit.qweight import QuantizedWeight, WeightLayout

    g = torch.Generator().manual_seed(0)
    for name, module in list(model.model.layers.named_modules()):
        if isinstance(module, torch.nn.Linear):
            layout = WeightLayout(scheme, tuple(module.weight.shape))
            codebook = torch.randn(layout.n_codebooks, 2**scheme.bits, scheme.vector_dim, generator=g) * 0.02
            codes = torch.randint(0, 2**scheme.bits, (module.out_features, module.in_features // scheme.vector_dim),
                                  dtype=torch.uint8, generator=g)
            set_submodule(model.model.layers, name,
                          QuantLinear.from_quantized(QuantizedWeight.from_codebook(codes, codebook, scheme)))


def _llama_cpp_row(model_name: str, qtype: str, threads: int, prompt_tokens: int, new_tokens: int,
                   repeats: int) -> dict:
    import llama_cpp
    import torch

    from lowbit.evaluate.speed import peak_rss_bytes

    path = ROOT / "out" / "speed" / f"{model_name}-{qtype}.gguf"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "lowbit", "export-gguf", model_name, "-o", str(path), "--type", qtype,
                        "--quiet"], check=True)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=prompt_tokens + new_tokens + 8, n_batch=512,
                          n_threads=threads, n_threads_batch=threads, verbose=False)
    vocab = llm.n_vocab()
    ids = torch.randint(0, vocab, (prompt_tokens + new_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    prefill, decode = [], []
    for i in range(repeats + 1):
        llm.reset()
        start = time.perf_counter()
        llm.eval(ids[:prompt_tokens])
        middle = time.perf_counter()
        for token in ids[prompt_tokens:prompt_tokens + new_tokens - 1]:
            llm.eval([token])
        end = time.perf_counter()
        if i:  # the first run is the warm-up
            prefill.append(prompt_tokens / (middle - start))
            decode.append((new_tokens - 1) / (end - middle))
    llm.close()
    return {"prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "prefill_tokens_per_second": max(prefill),
            "decode_tokens_per_second": max(decode), "threads": threads, "peak_rss_mib": peak_rss_bytes() / 2**20,
            "llama_cpp": llama_cpp.__version__}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--threads", default="1", help="comma-separated thread counts (default 1)")
    p.add_argument("--rows", help="row names separated by ';' (default: all)")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--resume", action="store_true", help="keep rows already in the results file")
    p.add_argument("--results", help="results file name in bench/results, without suffix "
                                     "(default decode_speed_MODEL)")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    if args.one:
        print(json.dumps(run_one(args.one, args.model, threads[0], args.prompt_tokens, args.new_tokens, args.repeats)))
        return
    rows = args.rows.split(";") if args.rows else list(ROWS)
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        sys.exit(f"unknown rows {unknown}; valid: {', '.join(ROWS)}")
    out = RESULTS / f"{args.results or 'decode_speed_' + args.model}.json"
    previous = json.loads(out.read_text()) if args.resume and out.exists() else {}
    results = previous.get("rows", [])
    done = {(r["row"], r["threads"], r["prompt_tokens"]) for r in results}
    quoted = [f'"{a}"' if " " in a or ";" in a else a for a in sys.argv[1:]]
    commands = [*previous.get("commands", []), " ".join(["python", "bench/decode_speed.py", *quoted])]
    for t in threads:
        for row in rows:
            if (row, t, args.prompt_tokens) in done:
                continue
            proc = subprocess.run([sys.executable, __file__, "--one", row, "--model", args.model, "--threads", str(t),
                                   "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens),
                                   "--repeats", str(args.repeats)], capture_output=True, text=True)
            if proc.returncode:
                print(f"{row} ({t} threads) failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            result = {"row": row, **json.loads(proc.stdout.strip().splitlines()[-1])}
            results.append(result)
            print(f"{row:48s} {t} thr  prefill {result['prefill_tokens_per_second']:8.1f}  "
                  f"decode {result['decode_tokens_per_second']:7.1f} tok/s", flush=True)
            _write(out, results, commands)


def _write(out: Path, results: list[dict], commands: list[str]) -> None:
    """JSON and a Markdown table with ratios to torch float32 at the same threads and prompt length."""
    # ratios: to torch float32 through the same loop (llama.cpp rows: to the lean loop's, where measured),
    # and decode to llama.cpp Q4_0 at the same threads and prompt
    base = {(r["threads"], r["prompt_tokens"], r["loop"]): r for r in results if r["row"].startswith("torch float32")}
    q4_0 = {(r["threads"], r["prompt_tokens"]): r for r in results if r["row"] == "llama.cpp Q4_0"}
    lines = [*(f"`{c}`  " for c in commands), "",
             "| model | loop | threads | prompt | decode tok/s | x fp32 | x Q4_0 | prefill tok/s | x fp32 | "
             "peak RSS MiB | huge pages MiB | kernels |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        key = (r["threads"], r["prompt_tokens"])
        b = base.get((*key, r.get("loop"))) or base.get((*key, "lean")) or base.get((*key, "transformers"))
        ratio = (lambda k: f"{r[k] / b[k]:.2f}") if b else (lambda k: "")
        q = q4_0.get(key)
        vs_q4 = f"{r['decode_tokens_per_second'] / q['decode_tokens_per_second']:.2f}" if q else ""
        kernels = ", ".join(f"{k} {n}" for k, n in (r.get("kernels") or {}).items())
        huge = "" if r.get("huge_pages_mib") is None else f"{r['huge_pages_mib']:.0f}"
        lines.append(f"| {r['row']} | {r.get('loop', 'llama.cpp')} | {r['threads']} | {r['prompt_tokens']} | "
                     f"{r['decode_tokens_per_second']:.1f} | {ratio('decode_tokens_per_second')} | {vs_q4} | "
                     f"{r['prefill_tokens_per_second']:.1f} | {ratio('prefill_tokens_per_second')} | "
                     f"{r['peak_rss_mib']:.0f} | {huge} | {kernels} |")
    write_results(out, {"commands": commands, "rows": results}, lines)


if __name__ == "__main__":
    main()

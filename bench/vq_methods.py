"""Vector and product quantization (GPTVQ) beside GPTQ at 2 and 3 bits per weight.

The protocol of ``bench/weight_methods.py`` (README): WikiText-2 raw test, the first 64 windows of
512 tokens (Gemma: 16 and 64 calibration windows), KL divergence to the float model over every
predicted position; calibration 128 windows of 512 tokens of cleaned WikiText-2 validation, seed
0, the same token ids for every row; lm_head stays float. Each quantization runs in its own
process (``bench/quantize_one.py``: quantize time and the process's peak RSS); checkpoints go to
``out/bench/<model>/`` and are reused when present. Rows are evaluated and written one at a time,
so a stopped run resumes with ``--resume``.

Run: ``python bench/vq_methods.py --model smollm2-135m [--rows "pq d4 k8 g64,gptq int2 g32"]``.
Writes ``bench/results/vq_methods_<model>.json`` and ``.md``.

``--layers``: the solve alone on single layers (GPTQ beside VQ/PQ on the same weight and Hessian from
the first 16 calibration windows), its process CPU time (fair on a shared machine, where wall time is
not) and relative output error ``tr(dW H dW^T) / tr(W H W^T)``; writes ``vq_layers_<model>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# name -> (bits class, quantize CLI flags); baselines in the same run, same calibration ids.
ROWS = {
    "pq d4 k8 g64": ("2-bit", ["--method", "pq", "--vq-dim", "4", "--codebook-bits", "8", "--group-size", "64"]),
    "gptq int2 g32": ("2-bit", ["--method", "gptq", "--bits", "2", "--group-size", "32", "--asym"]),
    "vq d4 k8 per-layer": ("2-bit", ["--method", "vq", "--vq-dim", "4", "--codebook-bits", "8"]),
    "pq d3 k7 g96": ("2-bit", ["--method", "pq", "--vq-dim", "3", "--codebook-bits", "7", "--group-size", "96"]),
    "pq d2 k5 g64": ("2-bit", ["--method", "pq", "--vq-dim", "2", "--codebook-bits", "5", "--group-size", "64"]),
    "pq d2 k6 g64": ("3-bit", ["--method", "pq", "--vq-dim", "2", "--codebook-bits", "6", "--group-size", "64"]),
    "gptq mse int3 g64": ("3-bit", ["--method", "gptq", "--observer", "mse", "--bits", "3", "--group-size", "64",
                                    "--asym"]),
}


def _slug(text: str) -> str:
    return text.replace(" ", "-")


def quantize_row(model: str, flags: list[str], out: Path, calib: Path) -> dict:
    """Quantize in a child process (unless ``out`` exists); its timing and peak RSS."""
    record = out / "bench_run.json"
    if not record.is_file():
        cmd = [sys.executable, str(ROOT / "bench" / "quantize_one.py"), model, "-o", str(out), "--calib-ids",
               str(calib), *flags]
        print("$", " ".join(cmd), file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True)
    return json.loads(record.read_text())


def _rows_on_disk(path: Path) -> list[dict]:
    return json.loads(path.read_text())["rows"] if path.is_file() else []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated names of ROWS: {', '.join(ROWS)}")
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--resume", action="store_true", help="keep the rows already in the results file (and those "
                    "other runs with --resume write meanwhile: rows may run in parallel processes)")
    ap.add_argument("--layers", action="store_true", help="time the solves on single layers instead")
    args = ap.parse_args()
    if args.layers:
        return layer_timing(args.model)

    from bench_results import write_results
    from bench_setup import bench_setup

    from lowbit.api import load
    from lowbit.evaluate.perplexity import evaluate_models
    from lowbit.evaluate.size import size_report
    from lowbit.memory import page_out

    unknown = [r for r in args.rows.split(",") if r not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; valid: {', '.join(ROWS)}")
    setup = bench_setup("bench/vq_methods.py", args.model, args.calib_samples, args.windows)
    out_json = ROOT / "bench" / "results" / f"vq_methods_{setup.name}.json"
    rows = _rows_on_disk(out_json) if args.resume else []
    done = {r["row"] for r in rows}
    for name in [r for r in args.rows.split(",") if r not in done]:
        bits, flags = ROWS[name]
        out = setup.work / f"vq-bench-{_slug(name)}-c{args.calib_samples}"
        page_out(setup.reference.parameters())  # the child's RSS is its own (see weight_methods.py)
        run = quantize_row(args.model, flags, out, setup.calib_path)
        model = load(out)[0]
        result = evaluate_models([model], setup.windows, bos_id=setup.bos_id, reference=setup.reference)[0]
        row = {"row": name, "bits": bits, "flags": " ".join(flags), "bpw": size_report(model).bpw, **run,
               **result.to_dict()}
        del model
        # rows other runs wrote meanwhile are kept (rows run in parallel processes, one each)
        rows = [r for r in (_rows_on_disk(out_json) if args.resume else rows) if r["row"] != name] + [row]
        rows.sort(key=lambda r: list(ROWS).index(r["row"]))
        write_results(out_json, {**setup.meta, "rows": rows}, markdown(setup.meta, rows))
    print("\n".join(markdown(setup.meta, rows)))


# layer -> block index and module path; (method, scheme fields) solved on each.
LAYERS = {"layers.5.self_attn.q_proj": (5, "self_attn.q_proj"), "layers.5.mlp.gate_proj": (5, "mlp.gate_proj"),
          "layers.5.mlp.down_proj": (5, "mlp.down_proj")}
LAYER_SOLVES = {
    "gptq int2 g32": ("gptq", dict(bits=2, group_size=32, symmetric=False)),
    "pq d4 k8 g64": ("pq", dict(format="vq", bits=8, vector_dim=4, group_size=64, shared_codebook=True)),
    "vq d4 k8 per-layer": ("vq", dict(format="vq", bits=8, vector_dim=4, granularity="tensor")),
    "gptq mse int3 g64": ("gptq", dict(bits=3, group_size=64, symmetric=False, observer="mse")),
    "pq d2 k6 g64": ("pq", dict(format="vq", bits=6, vector_dim=2, group_size=64, shared_codebook=True)),
    "pq d3 k7 g96": ("pq", dict(format="vq", bits=7, vector_dim=3, group_size=96, shared_codebook=True)),
    "pq d2 k5 g64": ("pq", dict(format="vq", bits=5, vector_dim=2, group_size=64, shared_codebook=True)),
}


def layer_timing(model_name: str) -> None:
    import time

    import torch
    from bench_results import write_results
    from bench_setup import bench_setup
    from safetensors.torch import load_file

    from lowbit.methods import get_method
    from lowbit.scheme import QuantScheme

    setup = bench_setup("bench/vq_methods.py", model_name, 128, 1)
    model = setup.reference
    calib = load_file(str(setup.calib_path))["input_ids"][:16]
    rows = []
    for name, (block, path) in LAYERS.items():
        layer = model.model.layers[block].get_submodule(path)
        xs = []

        class Stop(Exception):
            pass

        def keep(module, args):
            xs.append(args[0].reshape(-1, args[0].shape[-1]).float())
            raise Stop

        handle = layer.register_forward_pre_hook(keep)
        with torch.no_grad():
            for window in calib:
                try:
                    model(window[None], use_cache=False)
                except Stop:
                    pass
        handle.remove()
        x = torch.cat(xs)
        H = 2 * x.T @ x / x.shape[0]
        W = layer.weight.detach().float()
        total = float(((W @ H) * W).sum())
        for solve, (method, fields) in LAYER_SOLVES.items():
            start = time.process_time()
            qw = get_method(method).quantize(W, QuantScheme(**fields), statistics={"hessian": H}, layer=name)
            cpu = time.process_time() - start
            dW = qw.dequantize() - W
            rows.append({"layer": name, "shape": list(W.shape), "solve": solve, "bpw": qw.bits_per_weight,
                         "cpu_seconds": cpu, "relative_output_error": float(((dW @ H) * dW).sum()) / total})
            print(rows[-1], flush=True)
    lines = [f"{setup.name}: one layer's solve, Hessian from 16 x 512 calibration tokens; process CPU time, "
             f"{torch.get_num_threads()} thread(s); `{setup.meta['command']}`", "",
             "| layer | shape | solve | bits/weight | CPU s | tr(dW H dW^T) / tr(W H W^T) |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['layer']} | {'x'.join(map(str, r['shape']))} | {r['solve']} | {r['bpw']:.3f} | {r['cpu_seconds']:.2f} | "
              f"{r['relative_output_error']:.5f} |" for r in rows]
    write_results(ROOT / "bench" / "results" / f"vq_layers_{setup.name}.json", {**setup.meta, "rows": rows}, lines)
    print("\n".join(lines))


def markdown(meta: dict, rows: list[dict]) -> list[str]:
    lines = [(f"{meta['model']}: WikiText-2 test, {meta['windows']} x {meta['seqlen']} tokens, KL to float; "
              f"calibration {meta['calibration']}; `{meta['command']}`"), "",
             "| bits | row | quantize flags | bits/weight | ppl | KL | top-1 | quantize s | peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['bits']} | {r['row']} | `{r['flags']}` | {r['bpw']:.3f} | {r['ppl']:.3f} | {r['kld']:.4f} | "
                     f"{r['top1']:.3f} | {r['quantize_seconds']:.1f} | {r['peak_rss_bytes'] / 2**20:.0f} |")
    lines += ["", "bits/weight counts codes, scales, zero-points and codebooks (float16) of the quantized linears; "
              "quantize s is the quantization call, peak RSS the whole quantizing process."]
    return lines


if __name__ == "__main__":
    main()

"""Loading with ``LowbitConfig``: resident memory and quality of fp32, bf16, LLM.int8, NF4, NF4 + double
quant, FP4 and int4 (block 64), with bitsandbytes' CPU backend beside them (issue 5, part 4).

    python bench/load_4bit.py --model smollm2-135m [--peers]

Memory is measured, not computed: each configuration loads in a fresh process (``--measure NAME``),
runs one 512-token forward pass (so every weight page is touched) and reads ``/proc/self/status``;
the table gives the growth of resident memory over the process after its imports (anonymous and
file-backed pages: transformers maps float safetensors files, so an fp32 model sits in file-backed
pages), and the bytes the quantized linears' tensors hold, as bits per quantized parameter.
Quality: WikiText-2 raw test, 64 x 512 windows, perplexity and KL to the float32 model, all
configurations scored in one pass. Results: bench/results/load_4bit_<model>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench" / "peers"))
from peer_common import proc_status

BLOCK = 64
PEER_PYTHON = ROOT / "out" / "peers" / "bnb" / "bin" / "python"


def configs() -> dict[str, dict]:
    """Name -> ``from_pretrained`` keyword arguments (a LowbitConfig's fields under ``lowbit``)."""
    four = {"load_in_4bit": True, "block_size": BLOCK}
    return {
        "fp32": {"dtype": torch.float32},
        "bf16": {"dtype": torch.bfloat16},
        "int8 absmax (W8A8, no outliers)": {"lowbit": {"load_in_8bit": True, "int8_threshold": 1e30}},
        "LLM.int8 t=6": {"lowbit": {"load_in_8bit": True, "int8_threshold": 6.0}},
        "LLM.int8 t=2": {"lowbit": {"load_in_8bit": True, "int8_threshold": 2.0}},
        "nf4": {"lowbit": {**four, "quant_type": "nf4", "double_quant": False}},
        "nf4 + dq": {"lowbit": {**four, "quant_type": "nf4", "double_quant": True}},
        "fp4 + dq": {"lowbit": {**four, "quant_type": "fp4", "double_quant": True}},
        "int4 + dq": {"lowbit": {**four, "quant_type": "int4", "double_quant": True}},
    }


def load(model_dir: str, name: str):
    from transformers import AutoModelForCausalLM

    import lowbit

    kwargs = dict(configs()[name])
    if "lowbit" in kwargs:
        kwargs = {"quantization_config": lowbit.LowbitConfig(**kwargs.pop("lowbit"))}
    return AutoModelForCausalLM.from_pretrained(model_dir, **kwargs).eval()


def linear_bytes(model) -> tuple[int, int]:
    """(bytes held by the quantized linears' tensors, or by the float linears when none are quantized;
    parameters of those linears). The embedding and lm_head (skipped) are not counted."""
    from lowbit.nn import QuantLinear

    quantized = [m for m in model.modules() if isinstance(m, QuantLinear)]
    if quantized:
        held = sum(t.nbytes for m in quantized for name, t in m.named_buffers())
        return held, sum(m.in_features * m.out_features for m in quantized)
    linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")]
    return sum(m.weight.nbytes for m in linears), sum(m.weight.numel() for m in linears)


def measure(model_dir: str, name: str) -> dict:
    """Run in a fresh process: memory growth of loading ``name`` and one forward pass."""
    import lowbit  # noqa: F401  (imports first: they are not the model's memory)

    torch.set_num_threads(2)
    before = proc_status()
    model = load(model_dir, name)
    after_load = proc_status()
    with torch.inference_mode():
        model(torch.arange(512).reshape(1, 512) % 1000)
    after_forward = proc_status()
    held, params = linear_bytes(model)
    return {"config": name, "rss_growth_after_load": after_load["VmRSS"] - before["VmRSS"],
            "rss_growth_after_forward": after_forward["VmRSS"] - before["VmRSS"],
            "anon_growth_after_forward": after_forward["RssAnon"] - before["RssAnon"],
            "file_growth_after_forward": after_forward["RssFile"] - before["RssFile"],
            "peak_growth": after_forward["VmHWM"] - before["VmRSS"],
            "linear_bytes": held, "linear_params": params, "linear_bits_per_param": held * 8 / params}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--peers", action="store_true", help="add bitsandbytes rows (bash bench/peers/setup.sh bnb)")
    ap.add_argument("--measure", help=argparse.SUPPRESS)  # internal: one configuration's memory, as JSON
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.model_dir, args.measure)))
        return

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_setup import bench_setup
    from safetensors.torch import save_file

    from lowbit.evaluate.perplexity import evaluate_models
    from lowbit.nn.int8_linear import Int8OutlierLinear
    from lowbit.sources import resolve_model

    setup = bench_setup("bench/load_4bit.py", args.model, 128, args.windows)
    model_dir = resolve_model(args.model).path
    rows = {}
    for name in configs():
        out = subprocess.run([sys.executable, __file__, "--measure", name, "--model-dir", model_dir],
                             check=True, capture_output=True, text=True).stdout
        rows[name] = json.loads(out.strip().splitlines()[-1])
        print(json.dumps(rows[name]), flush=True)
    models = {name: load(model_dir, name) for name in configs() if name != "fp32"}
    results = evaluate_models(list(models.values()), setup.windows, bos_id=setup.bos_id, reference=setup.reference)
    ref = evaluate_models([setup.reference], setup.windows, bos_id=setup.bos_id, progress=False)[0]
    rows["fp32"].update(ppl=ref.ppl, kld=0.0, top1=1.0)
    for (name, model), result in zip(models.items(), results):
        rows[name].update(ppl=result.ppl, kld=result.kld, top1=result.top1)
        int8 = [m for m in model.modules() if isinstance(m, Int8OutlierLinear)]
        if int8:
            stats = [m.outlier_stats() for m in int8]
            rows[name]["outliers"] = {
                "layers": len(stats), "max_columns_per_call": max(s["max_per_call"] for s in stats),
                "mean_columns_per_call": sum(s["mean_per_call"] for s in stats) / len(stats),
                "layers_with_any": sum(s["distinct"] > 0 for s in stats),
                "per_layer_distinct": {n: m.outlier_stats()["distinct"] for n, m in model.named_modules()
                                       if isinstance(m, Int8OutlierLinear)}}
    if args.peers:
        ids_path = setup.work / f"eval-{args.windows}x512.safetensors"
        save_file({"input_ids": setup.windows.contiguous()}, str(ids_path))
        for mode in ("nf4 + dq", "nf4", "fp4 + dq", "int8"):
            out_json = setup.work / f"bnb-{mode.replace(' + ', '-')}.json"
            cmd = [str(PEER_PYTHON), str(ROOT / "bench" / "peers" / "bnb_4bit.py"), "--model", model_dir,
                   "--windows", str(ids_path), "--mode", mode, "--out", str(out_json)]
            if setup.bos_id is not None:
                cmd += ["--bos-id", str(setup.bos_id)]
            subprocess.run(cmd, check=True)
            rows[f"bitsandbytes {mode}"] = json.loads(out_json.read_text())
    write_results(setup, rows)


def write_results(setup, rows: dict) -> None:
    results = ROOT / "bench" / "results"
    results.mkdir(exist_ok=True)
    stem = f"load_4bit_{setup.name}"
    (results / f"{stem}.json").write_text(json.dumps({"meta": setup.meta, "rows": rows}, indent=2) + "\n")
    float_ppl = rows["fp32"]["ppl"]
    lines = [f"# Loading with LowbitConfig: {setup.name}", "",
             (f"`{setup.meta['command']}` ({setup.meta['date']}, torch {setup.meta['torch']}, "
             f"{setup.meta['threads']} threads). Memory: growth of resident memory over the process after its "
             "imports, after loading, and after one 512-token forward pass as well, in a fresh process per row. Linear bits: "
             "bytes held by the quantized linears' tensors x 8 / their parameters (embedding and lm_head in float "
             f"in every row). Quality: WikiText-2 raw test, {setup.meta['windows']} x {setup.meta['seqlen']}, "
             "KL to the float32 model."), "",
             ("| config | RSS growth after load (MiB) | after a forward pass | anon / file (MiB) | "
              "linear bits/param | ppl | ppl vs fp32 | KL | top-1 |"),
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        after_load = f"{r['rss_growth_after_load'] / 2**20:.0f}" if "rss_growth_after_load" in r else "-"
        lines.append(f"| {name} | {after_load} | {r['rss_growth_after_forward'] / 2**20:.0f} | "
                     f"{r['anon_growth_after_forward'] / 2**20:.0f} / {r['file_growth_after_forward'] / 2**20:.0f} | "
                     f"{r['linear_bits_per_param']:.3f} | {r['ppl']:.3f} | {100 * (r['ppl'] / float_ppl - 1):+.2f}% | "
                     f"{r['kld']:.4f} | {r['top1']:.4f} |")
    for name, r in rows.items():
        if "outliers" in r:
            o = r["outliers"]
            lines.append(f"\n{name}: {o['layers_with_any']}/{o['layers']} layers met an outlier column; at most "
                         f"{o['max_columns_per_call']} columns in one call, {o['mean_columns_per_call']:.1f} on "
                         "average per layer and call.")
    (results / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

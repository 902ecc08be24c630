"""lowbit's exports loaded by the tools people deploy with, scored on the same windows as lowbit's own eval.

For each row: a lowbit checkpoint of the model (``lowbit quantize``, reused when present under
``out/bench/<model>/export_clients/``), exported with ``lowbit export --to FORMAT``, then loaded by a real
client in its own virtual environment (``bench/peers/setup.sh``): GPTQModel for GPTQ/AWQ directories
(``bench/peers/client_gptqmodel.py``), the ``compressed-tensors`` package for compressed-tensors
directories (``bench/peers/client_compressed_tensors.py``). The client scores WikiText-2 raw test, the
first ``--windows`` windows of 512 tokens (the README protocol; BOS first where the model needs it), with
lowbit's scoring code loaded by path, and compares its dequantized weights of the first block with
lowbit's. The target: the client's perplexity within 0.1% of lowbit's eval of the checkpoint. Where a
W8A8 row misses it, ``bench/ct_activation_probe.py`` compares the two sides' activation quantization
layer by layer and scores lowbit's checkpoint with the client's arithmetic.

Each row is written as it finishes (``bench/results/export_clients_<model>.json`` and ``.md``; with
``--windows N`` other than 64, ``export_clients_<model>_<N>windows``); a row already there is kept (delete
the file to re-measure).

Run: ``python bench/export_clients.py --model smollm2-135m [--rows NAME,...]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench_results import write_results  # this directory (sys.path[0])

ROOT = Path(__file__).resolve().parent.parent
SEQLEN = 512
TOLERANCE = 0.001  # the client's perplexity within 0.1% of lowbit's
CHECKPOINTS = {  # name -> lowbit quantize flags
    "int4-g64-rtn": ["--bits", "4", "--group-size", "64"],
    "int4-g64-asym-rtn": ["--bits", "4", "--group-size", "64", "--asym"],
    "int8-channel-rtn": ["--bits", "8", "--per-channel"],
    "w8a8-int8-dynamic": ["--weights", "int8", "--acts", "int8"],
    "w8a8-int8-static": ["--weights", "int8", "--acts", "int8", "--act-mode", "static"],
    "fp8-e4m3-dynamic": ["--weights", "fp8_e4m3", "--acts", "fp8_e4m3"],
}
ROWS = {  # name -> (checkpoint, export flags, client, client flags)
    "gptq int4 g64": ("int4-g64-rtn", ["--to", "gptq"], "gptqmodel", ["--kernel", "torch"]),
    "gptq int4 g64 fused bf16 kernel": ("int4-g64-rtn", ["--to", "gptq"], "gptqmodel", ["--kernel", "fused"]),
    "gptq_v2 int4 g64 asym": ("int4-g64-asym-rtn", ["--to", "gptq", "--gptq-v2"], "gptqmodel", ["--kernel", "torch"]),
    "awq int4 g64 asym": ("int4-g64-asym-rtn", ["--to", "awq"], "gptqmodel", ["--kernel", "torch"]),
    "compressed-tensors int4 g64": ("int4-g64-rtn", ["--to", "compressed-tensors"], "compressed_tensors", []),
    "compressed-tensors int4 g64 asym": ("int4-g64-asym-rtn", ["--to", "compressed-tensors"], "compressed_tensors", []),
    "compressed-tensors int8 channel": ("int8-channel-rtn", ["--to", "compressed-tensors"], "compressed_tensors", []),
    "compressed-tensors W8A8 int8 dynamic": ("w8a8-int8-dynamic", ["--to", "compressed-tensors"],
                                             "compressed_tensors", []),
    "compressed-tensors W8A8 int8 static": ("w8a8-int8-static", ["--to", "compressed-tensors"],
                                            "compressed_tensors", []),
    "compressed-tensors FP8 dynamic": ("fp8-e4m3-dynamic", ["--to", "compressed-tensors"], "compressed_tensors", []),
}
CLIENT_VENVS = {"gptqmodel": "gptqmodel", "compressed_tensors": "llmcompressor"}


def lowbit_cli(*args: str) -> None:
    cmd = [sys.executable, "-m", "lowbit", *args, "--quiet"]
    print("$", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


def lowbit_eval(checkpoint: Path, windows: torch.Tensor, bos_id: int | None, cache: Path) -> dict:
    """lowbit's own eval of ``checkpoint`` (cached in ``cache``), and its first block's dequantized weights."""
    from safetensors.torch import save_file

    from lowbit.api import load
    from lowbit.evaluate.perplexity import evaluate_windows
    from lowbit.nn import prepare_kernels, quantized_layers

    if not cache.is_file():
        model, _ = load(checkpoint)
        layers = quantized_layers(model)
        first = next(iter(layers)).rsplit(".", 2)[0]  # model.layers.0
        save_file({n: m.quantized_weight().dequantize().contiguous() for n, m in layers.items()
                   if n.startswith(first + ".")}, str(cache.with_suffix(".weights.safetensors")))
        prepare_kernels(model, activations="float32")
        result = evaluate_windows(model, windows, bos_id=bos_id, progress=False).to_dict()
        cache.write_text(json.dumps(result, indent=2) + "\n")
    return json.loads(cache.read_text())


def table(rows: dict[str, dict]) -> list[str]:
    lines = ["| export | client | kernels | lowbit ppl | client ppl | difference | max weight diff | within 0.1% |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        if "error" in r:
            lines.append(f"| {name} | {r['client']} | - | {r.get('lowbit_ppl', float('nan')):.4f} | failed: "
                         f"{r['error']} | | | no |")
            continue
        diff = "-" if r["max_weight_diff"] is None else f"{r['max_weight_diff']:.3g}"
        lines.append(f"| {name} | {r['client']} | {', '.join(r['kernels'])} | {r['lowbit_ppl']:.4f} | "
                     f"{r['ppl']:.4f} | {100 * r['relative_difference']:+.4f}% | {diff} | "
                     f"{'yes' if r['within_tolerance'] else 'no'} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated row names")
    ap.add_argument("--windows", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from safetensors.torch import save_file

    from lowbit.api import load
    from lowbit.evaluate.text import default_eval_path, read_text, token_windows
    from lowbit.sources import needs_bos

    name = Path(args.model).name
    work = ROOT / "out" / "bench" / name / "export_clients"
    work.mkdir(parents=True, exist_ok=True)
    _, tokenizer = load(args.model)
    bos_id = tokenizer.bos_token_id if needs_bos(tokenizer) else None
    windows = token_windows(read_text(default_eval_path()), tokenizer, SEQLEN, args.windows)
    ids_path = work / f"eval-{args.windows}x{SEQLEN}.safetensors"
    save_file({"input_ids": windows.contiguous()}, str(ids_path))
    suffix = "" if args.windows == 64 else f"_{args.windows}windows"  # a shorter run never mixes with the protocol's
    out = ROOT / "bench" / "results" / f"export_clients_{name}{suffix}.json"
    done = json.loads(out.read_text())["rows"] if out.is_file() else {}
    meta = {"command": " ".join(["python", "bench/export_clients.py", *sys.argv[1:]]), "model": name,
            "windows": args.windows, "seqlen": SEQLEN, "bos": bos_id is not None, "tolerance": TOLERANCE,
            "torch": torch.__version__, "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")}
    for row in args.rows.split(","):
        if row in done:
            continue
        ckpt_name, export_flags, client, client_flags = ROWS[row]
        checkpoint = work / ckpt_name
        if not checkpoint.is_dir():
            lowbit_cli("quantize", args.model, "-o", str(checkpoint), *CHECKPOINTS[ckpt_name])
        ours = lowbit_eval(checkpoint, windows, bos_id, work / f"{ckpt_name}.eval-{args.windows}.json")
        exported = work / f"{ckpt_name}.{'-'.join(f.lstrip('-') for f in export_flags)}"
        lowbit_cli("export", str(checkpoint), *export_flags, "-o", str(exported), "--overwrite")
        python = ROOT / "out" / "peers" / CLIENT_VENVS[client] / "bin" / "python"
        row_path = work / f"{ckpt_name}.{client}.{'-'.join(f.lstrip('-') for f in client_flags) or 'default'}.json"
        cmd = [str(python), str(ROOT / "bench" / "peers" / f"client_{client}.py"), "--model", str(exported),
               "--windows", str(ids_path), "--out", str(row_path), *client_flags,
               "--reference-weights", str((work / f"{ckpt_name}.eval-{args.windows}.json").with_suffix(".weights.safetensors"))]
        if bos_id is not None:
            cmd += ["--bos-id", str(bos_id)]
        print("$", " ".join(cmd), file=sys.stderr, flush=True)
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            error = (run.stderr.strip().splitlines() or ["exit status %d" % run.returncode])[-1][:300]
            done[row] = {"client": client, "lowbit_ppl": ours["ppl"], "error": error,
                         "export": f"lowbit export {ckpt_name} {' '.join(export_flags)}"}
        else:
            r = json.loads(row_path.read_text())
            rel = r["ppl"] / ours["ppl"] - 1
            done[row] = {**r, "lowbit_ppl": ours["ppl"], "relative_difference": rel,
                         "within_tolerance": abs(rel) <= TOLERANCE,
                         "export": f"lowbit export {ckpt_name} {' '.join(export_flags)}",
                         "quantize": f"lowbit quantize {args.model} {' '.join(CHECKPOINTS[ckpt_name])}"}
        write_results(out, {"meta": meta, "rows": done}, table(done))
        print(json.dumps({row: {k: done[row].get(k) for k in ("lowbit_ppl", "ppl", "relative_difference", "error")}}),
              flush=True)


if __name__ == "__main__":
    main()

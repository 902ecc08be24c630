"""Weight-only methods side by side: RTN, GPTQ, AWQ, HQQ (and peers' GPTQ) at the same settings.

Protocol of the foundation issue: WikiText-2 raw test, the first 64 windows of 512 tokens (BOS
first for models that need it), KL divergence to the float model over every predicted position.
Calibration for GPTQ/AWQ (and the peers): 128 windows of 512 tokens of cleaned WikiText-2
validation, seed 0, the same token ids for every tool. lm_head stays float for every row.

Each quantization runs in its own process (``bench/quantize_one.py``), so its quantize time and
peak RSS are its own; checkpoints go to ``out/bench/<model>/`` and are reused when present
(delete them to re-measure). Peers (``--peers``) run in their own virtual environments
(``bench/peers/setup.sh``) and write their dequantized weights, evaluated here like the rest.

Run: ``python bench/weight_methods.py --model smollm2-135m [--peers]`` (2 cores: about an hour per
model). Writes ``bench/results/weight_methods_<model>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {  # name -> quantize CLI flags
    "int4 per-channel": ["--bits", "4", "--per-channel", "--sym"],
    "int4 g64": ["--bits", "4", "--group-size", "64", "--asym"],
    "int3 g64": ["--bits", "3", "--group-size", "64", "--asym"],
    "nf4 g64": ["--format", "nf4", "--group-size", "64"],
    "int2 g32": ["--bits", "2", "--group-size", "32", "--asym"],
}
METHODS = ("rtn", "hqq", "gptq", "awq")
# Rows beyond the plain method names: name -> quantize CLI flags. "gptq mse": GPTQ whose group (or
# row) ranges come from the mse observer's shrink search instead of min-max (what GPTQ's reference
# code calls mse=True); off by default in --methods so the main rows stay the peers' settings.
METHOD_FLAGS = {"gptq mse": ["--method", "gptq", "--observer", "mse"]}
# Peers' GPTQ at the settings where their formats match lowbit's exactly (integer grids; the
# peers have no NF4 GPTQ). Symmetry as in SETTINGS.
PEER_SETTINGS = {"int4 per-channel": (4, -1, True), "int4 g64": (4, 64, False), "int3 g64": (3, 64, False)}
PEER_SETTINGS_DEFAULT = "int4 per-channel,int4 g64"
PEERS = ("llmcompressor", "gptqmodel")


def _slug(text: str) -> str:
    return text.replace(" ", "-").replace("+", "-")


def run_lowbit(model: str, setting: str, method: str, out: Path, calib: Path) -> dict:
    """Quantize in a child process (unless ``out`` exists); its timing and peak RSS."""
    record = out / "bench_run.json"
    if not record.is_file():
        cmd = [sys.executable, str(ROOT / "bench" / "quantize_one.py"), model, "-o", str(out),
               *METHOD_FLAGS.get(method, ["--method", method]), "--calib-ids", str(calib), *SETTINGS[setting]]
        print("$", " ".join(cmd), file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True)
    return json.loads(record.read_text())


def run_peer(peer: str, float_dir: Path, setting: str, out: Path, calib: Path) -> dict | None:
    """A peer's GPTQ in its own venv (unless ``out`` exists); None when the venv is missing."""
    python = ROOT / "out" / "peers" / peer / "bin" / "python"
    if not (out / "peer.json").is_file():
        if not python.is_file():
            print(f"skip {peer}: no venv at {python.parent.parent} (run bench/peers/setup.sh)", file=sys.stderr)
            return None
        bits, group, sym = PEER_SETTINGS[setting]
        cmd = [str(python), str(ROOT / "bench" / "peers" / f"run_{peer}.py"), "--model", str(float_dir),
               "--calib", str(calib), "--bits", str(bits), "--group-size", str(group),
               "--sym" if sym else "--asym", "--act-order", "--damp", "0.01", "--out", str(out)]
        print("$", " ".join(cmd), file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True, env={**os.environ, "GPTQMODEL_CPU_WORKERS": "2"})
    return json.loads((out / "peer.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated; also {', '.join(METHOD_FLAGS)}")
    ap.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated names of SETTINGS")
    ap.add_argument("--peers", nargs="?", const=PEER_SETTINGS_DEFAULT, default="",
                    help=f"add llm-compressor's and GPTQModel's GPTQ at these settings (default {PEER_SETTINGS_DEFAULT!r}; "
                         f"possible: {', '.join(PEER_SETTINGS)})")
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--resume", action="store_true", help="keep the settings already in the results file")
    args = ap.parse_args()

    from bench_setup import bench_setup

    from lowbit.api import load
    from lowbit.evaluate.perplexity import evaluate_models
    from lowbit.evaluate.size import size_report
    from lowbit.memory import page_out
    from lowbit.sources import resolve_model

    setup = bench_setup("bench/weight_methods.py", args.model, args.calib_samples, args.windows)
    name, work, reference, bos_id, windows, meta = (setup.name, setup.work, setup.reference, setup.bos_id,
                                                    setup.windows, setup.meta)
    calib = setup.calib_path
    out_json = ROOT / "bench" / "results" / f"weight_methods_{name}.json"
    if args.resume and out_json.is_file():
        rows = json.loads(out_json.read_text())["rows"]
    else:
        float_row = {"setting": "float", "method": "-", "tool": "-", "quantize_seconds": 0.0, "peak_rss_bytes": 0,
                     "bpw": size_report(reference).bpw}
        float_row.update(evaluate_models([reference], windows, bos_id=bos_id, reference=reference)[0].to_dict())
        rows = [float_row]
    methods = args.methods.split(",")
    done = {r["setting"] for r in rows if r["tool"] == "lowbit" and r["method"] in methods}
    for setting in [s for s in args.settings.split(",") if s and s not in done]:  # evaluated and saved one by one
        batch: list[tuple[dict, Path]] = []
        for method in methods:
            out = work / f"{_slug(method)}-{_slug(setting)}"
            # Pages of the checkpoint that this process's reference has read are shared with the
            # child's mapping of the same file, and the kernel pages out only unshared pages: drop
            # ours (their contents come back on the next read), so the child's RSS is its own.
            page_out(reference.parameters())
            run = run_lowbit(args.model, setting, method, out, calib)
            batch.append(({"setting": setting, "method": method, "tool": "lowbit", **run}, out))
        if setting in args.peers.split(",") and setting in PEER_SETTINGS:
            for peer in PEERS:
                out = work / f"{peer}-gptq-{_slug(setting)}"
                page_out(reference.parameters())
                run = run_peer(peer, Path(resolve_model(args.model).path), setting, out, calib)
                if run is not None:
                    batch.append(({"setting": setting, "method": "gptq", "tool": f"{run['tool']} {run['version']}",
                                   "quantize_seconds": run["quantize_seconds"],
                                   "peak_rss_bytes": run["peak_rss_bytes"]}, out))
        models = []
        for row, d in batch:
            model = load(d)[0]
            models.append(model)
            if row["tool"] == "lowbit":
                row["bpw"] = size_report(model).bpw
        for (row, _), result in zip(batch, evaluate_models(models, windows, bos_id=bos_id, reference=reference)):
            row.update(result.to_dict())
            rows = [r for r in rows if (r["setting"], r["method"], r["tool"]) != (setting, row["method"], row["tool"])]
            rows.append(row)
        del models
        out_json.write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
        out_json.with_suffix(".md").write_text(markdown(meta, rows))
    print(markdown(meta, rows))


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [(f"{meta['model']}: WikiText-2 test, {meta['windows']} x {meta['seqlen']} tokens, KL to float; "
              f"calibration {meta['calibration']}; `{meta['command']}`"), "",
             "| setting | method | tool | bits/weight | ppl | KL | top-1 | quantize s | peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        bpw = f"{r['bpw']:.3f}" if "bpw" in r else "-"
        lines.append(f"| {r['setting']} | {r['method']} | {r['tool']} | {bpw} | {r['ppl']:.3f} | {r['kld']:.4f} | "
                     f"{r['top1']:.3f} | {r['quantize_seconds']:.1f} | {r['peak_rss_bytes'] / 2**20:.0f} |")
    lines.append("")
    lines.append("Peers' rows are their dequantized weights on the same grid (bits/weight not measured: '-'); "
                 "quantize s counts the quantization call only, peak RSS the whole process.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

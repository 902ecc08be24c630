"""W8A8 side by side: dynamic and static activation scales, each static observer, with and without
SmoothQuant, FP8 E4M3, SmoothQuant + GPTQ, Hadamard rotation (QuaRot) with RTN and GPTQ; optionally
the peers' W8A8 (``--peers``).

Every row's linears (all but ``lm_head``) run 8-bit products (``ActQuantLinear``: int8 x int8 ->
int32 through ``torch._int_mm``, or FP8 through ``torch._scaled_mm``), except the weight-only row
that shows what the int8 weights alone cost. Static scales are calibrated on 128 x 512 tokens of
cleaned WikiText-2 valid (seed 0, the windows ``bench/weight_methods.py`` uses); the four observers
read one set of histograms per weight variant, so they differ only in the threshold they pick.
Evaluation: WikiText-2 raw test, 512-token windows, perplexity and KL to the float model.

Run: ``python bench/activations.py --model smollm2-135m [--peers]``; results go to
``bench/results/activations_<model>.{json,md}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--no-gptq", action="store_true", help="skip the SmoothQuant + GPTQ rows (about 5 min each)")
    ap.add_argument("--peers", action="store_true", help="add llm-compressor's and optimum-quanto's W8A8 "
                    "(venvs from bench/peers/setup.sh)")
    ap.add_argument("--peers-only", action="store_true", help="keep lowbit's rows from the last results file and "
                    "(re)run only the peers on the same windows (missing peer results only)")
    ap.add_argument("--rotation-only", action="store_true", help="keep the last results file's rows and (re)run "
                    "only the rotation rows, on the same windows")
    ap.add_argument("--outlier-ratio", type=float, default=8.0, help="--act-outlier-ratio of the rotation rows "
                    "that keep outlier layers dynamic (default 8: the median token keeps 127/8 ~ 16 levels)")
    args = ap.parse_args()

    from bench_setup import bench_setup
    from safetensors.torch import load_file

    from lowbit.act_scheme import ActScheme
    from lowbit.api import quantize
    from lowbit.evaluate.perplexity import evaluate_models
    from lowbit.evaluate.size import size_report
    from lowbit.methods.smoothquant import SmoothQuantConfig
    from lowbit.pipeline.activations import (
        quantize_activations,
        record_activation_histograms,
    )
    from lowbit.pipeline.recipe import Recipe, TransformStep
    from lowbit.scheme import OBSERVERS

    setup = bench_setup("bench/activations.py", args.model, args.calib_samples, args.windows)
    name, work, reference, bos_id, windows, meta = (setup.name, setup.work, setup.reference, setup.bos_id,
                                                    setup.windows, setup.meta)
    calib_path = setup.calib_path
    calib = load_file(calib_path)["input_ids"]
    out = ROOT / "bench" / "results" / f"activations_{name}"
    if args.peers_only:
        meta, rows = previous_results(out, "peers")
        rows = [r for r in rows if "tool" not in r]  # lowbit's rows carry no "tool"
        rows += peer_rows(args, work, windows, bos_id, calib_path)
        write(out, meta, rows)
        return

    int8 = ActScheme()
    static = {o: ActScheme(dynamic=False, granularity="tensor", observer=o) for o in OBSERVERS}
    entries: list[tuple[dict, torch.nn.Module]] = []

    def weights_only(method: str, scheme, transforms=()):
        model = copy.deepcopy(reference)
        start = time.perf_counter()
        quantize(model, Recipe(method=method, default=scheme, transforms=transforms), calibration=calib,
                 progress=False)
        return model, time.perf_counter() - start

    def add(setting: str, method: str, model, seconds: float, act: ActScheme | None) -> None:
        print(f"{setting} ({method}): {seconds:.1f} s", file=sys.stderr, flush=True)
        entries.append(({"setting": setting, "method": method, "acts": act.describe() if act else "float",
                         "quantize_seconds": seconds, "bpw": size_report(model).bpw}, model))

    def with_acts(base, base_seconds: float, act: ActScheme, hist=None):
        model = copy.deepcopy(base)
        start = time.perf_counter()
        report = quantize_activations(model, act, calib, histograms=hist, progress=False)
        if report.dynamic_layers:
            print(f"  dynamic outlier layers: {report.dynamic_layers}", file=sys.stderr, flush=True)
        return model, base_seconds + time.perf_counter() - start

    if args.rotation_only:
        # Hadamard rotation (lowbit.methods.rotation), then RTN or GPTQ int8 weights; pure static
        # rows, and static rows whose outlier layers (--outlier-ratio) run dynamic per-token scales
        meta, previous_rows = previous_results(out, "rotation")
        previous_rows = [r for r in previous_rows if not r["method"].startswith("rotate")]
        for method in ("rtn", "gptq"):
            base, seconds = weights_only(method, int8.weight_scheme(), transforms=("hadamard",))
            label = f"rotate+{method}"
            if method == "rtn":
                add("W8 weight-only", label, copy.deepcopy(base), seconds, None)
            add("W8A8 dynamic per-token", label, *with_acts(base, seconds, int8), int8)
            start = time.perf_counter()
            hist = record_activation_histograms(base, calib, progress=False)
            hist_seconds = time.perf_counter() - start
            for observer in ("minmax", "mse") if method == "rtn" else ("mse",):
                for ratio in (None, args.outlier_ratio):
                    act = ActScheme(dynamic=False, granularity="tensor", observer=observer, outlier_ratio=ratio)
                    setting = f"W8A8 static {observer}" + ("" if ratio is None else f", outliers dynamic (>{ratio:g}x)")
                    add(setting, label, *with_acts(base, seconds + hist_seconds, act, hist), act)
            del base
        results = evaluate_models([model for _, model in entries], windows, bos_id=bos_id, reference=reference)
        rows = [row for row, _ in entries]
        for row, result in zip(rows, results):
            row.update(result.to_dict())
        lowbit_rows = [r for r in previous_rows if "tool" not in r]
        write(out, meta, lowbit_rows + rows + [r for r in previous_rows if "tool" in r])
        return

    # (method, SmoothQuant alpha, static observers): alpha 0.5 is the paper's default; 0.8 is what the
    # SmoothQuant authors use for Llama-2/Mistral-family models (mit-han-lab/smoothquant README).
    variants = [("rtn", None, OBSERVERS), ("smoothquant", 0.5, OBSERVERS), ("smoothquant", 0.8, ("minmax",))]
    for method, alpha, observers in variants:
        transforms = () if alpha is None else (TransformStep("smoothquant", SmoothQuantConfig(alpha=alpha)),)
        label = method if alpha is None else f"smoothquant a={alpha}"
        base, seconds = weights_only("rtn", int8.weight_scheme(), transforms)
        if alpha is None:
            add("W8 weight-only", label, copy.deepcopy(base), seconds, None)
        if alpha != 0.8:
            add("W8A8 dynamic per-token", label, *with_acts(base, seconds, int8), int8)
        start = time.perf_counter()
        hist = record_activation_histograms(base, calib, progress=False)
        hist_seconds = time.perf_counter() - start
        for observer in observers:
            act = static[observer]
            add(f"W8A8 static {observer}", label, *with_acts(base, seconds + hist_seconds, act, hist), act)
        del base
    fp8 = ActScheme(format="fp8_e4m3")
    fp8_static = ActScheme(format="fp8_e4m3", dynamic=False, granularity="tensor")
    base, seconds = weights_only("rtn", fp8.weight_scheme())
    add("FP8 W8A8 dynamic per-token", "rtn", *with_acts(base, seconds, fp8), fp8)
    add("FP8 W8A8 static minmax", "rtn", *with_acts(base, seconds, fp8_static), fp8_static)
    del base
    if not args.no_gptq:
        # alpha 0.5 + dynamic per-token is llm-compressor's W8A8 recipe (the peer row)
        for act, alpha in ((int8, 0.5), (static["minmax"], 0.8)):
            model = copy.deepcopy(reference)
            start = time.perf_counter()
            quantize(model, Recipe(method="gptq", transforms=(TransformStep("smoothquant", SmoothQuantConfig(alpha=alpha)),),
                                   default=act.weight_scheme(), activations=act),
                     calibration=calib, progress=False)
            add("W8A8 " + ("dynamic per-token" if act.dynamic else "static minmax"), f"smoothquant a={alpha}+gptq",
                model, time.perf_counter() - start, act)

    rows = [{"setting": "float", "method": "-", "acts": "float", "quantize_seconds": 0.0,
             "bpw": size_report(reference).bpw}]
    models = [reference]
    rows += [row for row, _ in entries]
    models += [model for _, model in entries]
    results = evaluate_models(models, windows, bos_id=bos_id, reference=reference)
    for row, result in zip(rows, results):
        row.update(result.to_dict())
    if args.peers:
        rows += peer_rows(args, work, windows, bos_id, calib_path)
    write(out, meta, rows)


def previous_results(out: Path, part: str) -> tuple[dict, list[dict]]:
    """The last results file's metadata and rows; the metadata records the command re-running ``part``."""
    previous = json.loads(out.with_suffix(".json").read_text())
    meta = {k: v for k, v in previous.items() if k != "rows"}
    meta[f"{part}_command"] = " ".join(["python", "bench/activations.py", *sys.argv[1:]])
    meta[f"{part}_date"] = time.strftime("%Y-%m-%d")
    return meta, previous["rows"]


def peer_rows(args: argparse.Namespace, work: Path, windows, bos_id: int | None, calib_path: Path) -> list[dict]:
    from safetensors.torch import save_file

    from lowbit.sources import resolve_model

    windows_path = work / f"eval-windows-{args.windows}x512.safetensors"
    save_file({"input_ids": windows.long().contiguous()}, str(windows_path))
    return run_peers(Path(resolve_model(args.model).path), calib_path, windows_path, work, bos_id)


def write(out: Path, meta: dict, rows: list[dict]) -> None:
    out.with_suffix(".json").write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(meta, rows))
    print(markdown(meta, rows))


def run_peers(float_dir: Path, calib: Path, windows: Path, work: Path, bos_id: int | None) -> list[dict]:
    """Each peer quantizes and evaluates in its own venv (its quantized activations only run there)
    with lowbit's evaluation code (``lowbit/evaluate/perplexity.py``, loaded by path) on the same
    token windows; its row comes back as JSON."""
    rows = []
    # llm-compressor twice: its documented W8A8 (dynamic per-token inputs) and the same recipe with
    # static per-tensor input scales, the peer of lowbit's static rows; quanto's are always static.
    for peer, extra in (("llmcompressor", []), ("llmcompressor", ["--static"]), ("quanto", [])):
        python = ROOT / "out" / "peers" / peer / "bin" / "python"
        if not python.is_file():
            print(f"skip {peer}: no venv at {python.parent.parent} (run bench/peers/setup.sh)", file=sys.stderr)
            continue
        out = work / f"{peer}-w8a8{'-static' if extra else ''}.json"
        if not out.is_file():
            cmd = [str(python), str(ROOT / "bench" / "peers" / f"w8a8_{peer}.py"), "--model", str(float_dir),
                   "--calib", str(calib), "--windows", str(windows), "--out", str(out), *extra,
                   *(["--bos-id", str(bos_id)] if bos_id is not None else [])]
            print("$", " ".join(cmd), file=sys.stderr, flush=True)
            subprocess.run(cmd, check=True)
        rows.append(json.loads(out.read_text()))
    return rows


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [(f"{meta['model']}: WikiText-2 test, {meta['windows']} x {meta['seqlen']} tokens, KL to float; "
              f"calibration {meta['calibration']}; `{meta['command']}`"), "",
             "| setting | method | tool | activations | bits/weight | ppl | ppl vs float | KL | top-1 | quantize s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    float_ppl = rows[0]["ppl"]
    for r in rows:
        bpw = f"{r['bpw']:.3f}" if r.get("bpw") else "-"
        lines.append(f"| {r['setting']} | {r['method']} | {r.get('tool', 'lowbit')} | {r['acts']} | {bpw} | {r['ppl']:.3f} | "
                     f"{100 * (r['ppl'] / float_ppl - 1):+.2f}% | {r['kld']:.4f} | {r['top1']:.3f} | "
                     f"{r['quantize_seconds']:.1f} |")
    lines.append("")
    lines.append("quantize s: weights, activation histograms and thresholds (the observers share one "
                 "histogram pass, whose time each static row counts). Peers: scored in their own venvs by the "
                 "same evaluation code on the same windows (bench/peers/README.md).")
    if meta.get("rotation_command"):
        lines.append(f"Rotation rows (rotate+...) added by `{meta['rotation_command']}` ({meta.get('rotation_date', '')}), "
                     "on the same windows and calibration.")
    if meta.get("peers_command"):
        lines.append(f"Peer rows re-run on their own by `{meta['peers_command']}` ({meta.get('peers_date', '')}), "
                     "beside the lowbit rows of the command above.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

"""Quantization-aware training: quality against training time, from a PTQ checkpoint.

Protocol of ``bench/weight_methods.py``: the start checkpoint is the PTQ row of that table made on
the same 128 x 512 calibration ids (``bench/quantize_one.py``, reused from ``out/bench/<model>/``);
every row is evaluated on WikiText-2 raw test, the first 64 windows of 512 tokens, KL to the float
model over every predicted position, in this run, beside the start checkpoint. Training text is
WikiText-2 validation (``lowbit train``'s default; never the test split).

Each budget is a ``lowbit train`` run in its own process (its peak RSS is its own), started from
the PTQ checkpoint; its time counts everything from the child's start to the checkpoint written
(loading, the teacher's top-k passes, both stages). Budgets are sized for a shared 2-core machine
at one thread; the full-budget command is in the README.

Resumable: a row whose checkpoint exists is evaluated, not trained again; a run interrupted during
training continues from its state (``--resume``); the results file is rewritten after every row.

Run: ``python bench/qat.py --model smollm2-135m --setting "int3 g64" [--budgets b1,b2]``. Writes
``bench/results/qat_<model>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# setting -> (start checkpoint directory under out/bench/<model>/, how bench/weight_methods.py made it)
STARTS = {
    "int3 g64": ("gptq-mse-int3-g64", "gptq mse"),
    "int3 g64 rtn": ("rtn-int3-g64", "rtn"),
    "int4 g64": ("awq-int4-g64", "awq"),
    "int2 g32": ("awq-int2-g32", "awq"),
    "w8a8 static": ("sq-gptq-w8a8-static", "smoothquant a=0.8+gptq"),
    "ternary g64": ("rtn-mse-ternary-g64", "rtn mse"),
}
START_FLAGS = {  # quantize flags of each start, as bench/weight_methods.py makes them
    "gptq-mse-int3-g64": ["--method", "gptq", "--observer", "mse", "--bits", "3", "--group-size", "64", "--asym"],
    "rtn-int3-g64": ["--method", "rtn", "--bits", "3", "--group-size", "64", "--asym"],
    "awq-int4-g64": ["--method", "awq", "--bits", "4", "--group-size", "64", "--asym"],
    "awq-int2-g32": ["--method", "awq", "--bits", "2", "--group-size", "32", "--asym"],
    # BitNet b1.58's codes {-1, 0, 1} with a float16 scale per 64 (2.25 bpw): the scale from the MSE
    # search, not BitNet's absmean, which is meant for training from scratch
    "rtn-mse-ternary-g64": ["--method", "rtn", "--format", "ternary", "--group-size", "64", "--observer", "mse"],
    # bench/activations.py's fully static row: SmoothQuant alpha 0.8, GPTQ int8 per channel, int8
    # inputs with one minmax scale per layer, no rotation, no dynamic fallback
    "sq-gptq-w8a8-static": ["--method", "smoothquant+gptq", "--smoothquant-alpha", "0.8", "--weights", "int8",
                            "--acts", "int8", "--act-mode", "static", "--act-observer", "minmax"],
}
# budget -> lowbit train flags. m60: sized for 60 minutes at one quiet thread (about 9 s per
# 512-token step and 2.5 s per teacher window on SmolLM2): the teacher's top-k over 128 windows once,
# then 330 steps of full QAT (weights through the straight-through rounding, step sizes in log space)
# on KL to the teacher. Block-AP is left out there: SmolLM2's residual stream carries a few channels
# in the hundreds from block 12 on, and a block's output MSE is that channel's carried error, which
# no block can undo (measured: 873.9 -> 873.9 from block 13 to 28).
BUDGETS = {
    "m60": ["--stage", "e2e", "--samples", "128", "--steps", "330", "--e2e-weight-lr", "5e-5", "--lr", "3e-3"],
    # W8A8: the error is in the activations' static scales, which may need to shrink by tens of
    # percent (a larger relative rate); int8 weights move a tenth as fast. Half the windows and
    # steps of m60: about 30 minutes.
    "m30w": ["--stage", "e2e", "--samples", "64", "--steps", "150", "--e2e-weight-lr", "5e-6", "--lr", "1e-2"],
    # bfloat16 compute (``--compute-dtype bfloat16``: about 1.4x faster steps here, so 480 steps fit
    # the hour) and three times m60's weight rate: m60's weights move at most about 0.4 of an int3
    # step over its whole schedule, and its held-out curve flattens after a third of its steps
    "m60bf": ["--stage", "e2e", "--samples", "128", "--steps", "480", "--e2e-weight-lr", "1.5e-4", "--lr", "3e-3",
              "--compute-dtype", "bfloat16"],
    # m60bf saw its 128 windows almost four times and overfitted them (training loss 0.20 -> 0.115,
    # held-out KL flat at 0.203 from step 330): 288 distinct windows (more than half of WikiText-2
    # valid), each seen about 1.4 times; the larger teacher pass (about 2.2 s a window) costs steps.
    # Like m60bf it needs a CPU with bfloat16 instructions: on an AVX2-only one a step took minutes
    "m60bfw": ["--stage", "e2e", "--samples", "288", "--steps", "400", "--e2e-weight-lr", "1e-4", "--lr", "3e-3",
               "--compute-dtype", "bfloat16"],
    # the ternary report's hour on an AVX2-only CPU (no bfloat16 units: float32 at about 14.5 s a
    # step): 200 steps over m60bfw's 288 windows, whose teacher cache (1,092 s here, beside other runs) comes
    # from the int3 run when it exists; ternary steps are as coarse as int2's, hence m120bf's weight rate
    "m60t": ["--stage", "e2e", "--samples", "288", "--steps", "200", "--e2e-weight-lr", "2e-4", "--lr", "3e-3"],
    # m60bfw's question in float32 on an AVX2-only CPU: do 288 distinct windows lift the held-out
    # plateau (0.203) that 128 windows hit? 200 steps on m60bfw's teacher cache (reused when it exists)
    "m60w": ["--stage", "e2e", "--samples", "288", "--steps", "200", "--e2e-weight-lr", "1e-4", "--lr", "3e-3"],
    # the int2 target's 120 minutes, bfloat16: 900 steps (about 6.7 s each beside another run); an
    # int2 step is more than twice an int3 step, so the weights move at four times m60's rate
    "m120bf": ["--stage", "e2e", "--samples", "128", "--steps", "900", "--e2e-weight-lr", "2e-4", "--lr", "3e-3",
               "--compute-dtype", "bfloat16"],
}
COMMON = ["--topk", "64", "--heldout", "2", "--eval-every", "30", "--save-every", "10", "--seed", "0"]


def train_row(model: str, start: Path, out: Path, budget: str) -> dict:
    """``lowbit train`` in a child process unless ``out`` exists; its report and wall time."""
    record = out.with_name(out.name + ".run.json")
    if not record.is_file():
        state = out.with_name(out.name + ".qat-state")
        cmd = [sys.executable, "-m", "lowbit", "train", str(start), "--teacher", model, "-o", str(out),
               "--state-dir", str(state), *BUDGETS[budget], *COMMON, "--json", "--overwrite"]
        if (state / "qat_state.safetensors").is_file():
            cmd.append("--resume")
        print("$", " ".join(cmd), file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        done = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        report = json.loads(done.stdout.strip().splitlines()[-1])
        report["wall_seconds"] = time.perf_counter() - t0
        report["command"] = " ".join(["lowbit", *cmd[3:]])
        record.write_text(json.dumps(report, indent=2) + "\n")
    return json.loads(record.read_text())


def torchao_row(model: str, lowbit_out: Path, out: Path, start_flags: list[str], budget_flags: list[str],
                symmetric: bool) -> dict:
    """torchao's QAT (``bench/peers/qat_torchao.py`` in the GPTQModel venv, torchao 0.18.0) on the grid of
    ``start_flags`` (symmetric when ``symmetric``) with the steps and weight learning rate of ``budget_flags``, on the teacher cache of
    the lowbit run that wrote ``lowbit_out``; unless ``out`` exists. Its report as a run record."""
    from lowbit.sources import resolve_model

    cache = lowbit_out.with_name(lowbit_out.name + ".qat-state") / "teacher_topk.safetensors"
    if not cache.is_file():
        raise SystemExit(f"no teacher cache at {cache}: run lowbit's budget first (same --setting, no --peer)")
    flag = lambda flags, name: flags[flags.index(name) + 1]  # noqa: E731
    steps, lr = flag(budget_flags, "--steps"), flag(budget_flags, "--e2e-weight-lr")
    grid = ["--bits", flag(start_flags, "--bits"), "--group-size", flag(start_flags, "--group-size"),
            "--asym" if "--asym" in start_flags and not symmetric else "--sym"]
    if not (out / "peer.json").is_file():
        cmd = [str(ROOT / "out" / "peers" / "gptqmodel" / "bin" / "python"), str(ROOT / "bench" / "peers" / "qat_torchao.py"),
               "--model", str(resolve_model(model).path), "--teacher-cache", str(cache), *grid,
               "--steps", steps, "--lr", lr, "--out", str(out)]
        print("$", " ".join(cmd), file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        report = json.loads((out / "peer.json").read_text())
        report["wall_seconds"] = time.perf_counter() - t0
        (out / "peer.json").write_text(json.dumps(report, indent=2) + "\n")
    report = json.loads((out / "peer.json").read_text())
    return {"seconds": {"total": report["quantize_seconds"]}, "wall_seconds": report.get("wall_seconds", 0.0),
            "peak_rss_bytes": report["peak_rss_bytes"], "start": f"float (torchao {report['version']})",
            "flags": f"torchao QAT {' '.join(grid)} --steps {steps} --lr {lr} (weights, cosine, Adam)",
            "heldout_kl": [], "heldout_seconds": []}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--setting", default="int3 g64", choices=list(STARTS))
    ap.add_argument("--budgets", default=",".join(BUDGETS))
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--resume", action="store_true", help="keep the rows already in the results file")
    ap.add_argument("--peer", choices=("torchao", "torchao-sym"),
                    help="instead of lowbit: torchao's QAT from the float model on the lowbit run's cached teacher, "
                         "windows, steps and schedule (run lowbit's budget first); torchao-sym: its symmetric grid "
                         "(torchao 0.18's asymmetric IntxFakeQuantizeConfig ignores the zero-point on SmolLM2's "
                         "lopsided groups: max weight error 1.6 against min-max RTN's 0.10 on a down_proj)")
    args = ap.parse_args()

    from bench_results import write_results
    from bench_setup import bench_setup

    from lowbit.api import load
    from lowbit.evaluate.perplexity import evaluate_models

    setup = bench_setup("bench/qat.py", args.model, 128, args.windows)
    start_name, start_method = STARTS[args.setting]
    start = setup.work / start_name
    if not (start / "bench_run.json").is_file():
        cmd = [sys.executable, str(ROOT / "bench" / "quantize_one.py"), args.model, "-o", str(start), "--overwrite",
               "--calib-ids", str(setup.calib_path), *START_FLAGS[start_name]]
        print("$", " ".join(cmd), file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True)
    out_json = ROOT / "bench" / "results" / f"qat_{setup.name}.json"
    rows = json.loads(out_json.read_text())["rows"] if args.resume and out_json.is_file() else []
    done = {(r["setting"], r["budget"]) for r in rows}
    made: set[tuple[str, str]] = set()  # the rows this run adds (other runs may write the file meanwhile)

    def save(rows: list[dict]) -> list[dict]:
        """Write the file's rows with this run's in place of theirs; the rows written."""
        if out_json.is_file():  # every row this run did not make is the file's
            rows = [r for r in json.loads(out_json.read_text())["rows"] if (r["setting"], r["budget"]) not in made] \
                + [r for r in rows if (r["setting"], r["budget"]) in made]
        payload = {**setup.meta, "common_flags": " ".join(COMMON), "rows": rows}
        write_results(out_json, payload, markdown(payload).splitlines())
        return rows

    budgets = [b for b in args.budgets.split(",") if b]
    if args.peer:
        pending = [(f"{b} {args.peer}", setup.work / f"{args.peer}-qat-{args.setting.replace(' ', '-')}-{b}")
                   for b in budgets if (args.setting, f"{b} {args.peer}") not in done]
    else:
        pending = [] if (args.setting, "ptq") in done else [("ptq", start)]
        pending += [(b, setup.work / f"qat-{start_name}-{b}") for b in budgets if (args.setting, b) not in done]
    ready: list[tuple[str, Path, dict]] = []
    for budget, path in pending:  # the start is evaluated with the first trained row: one reference pass
        if args.peer:
            run = torchao_row(args.model, setup.work / f"qat-{start_name}-{budget.split()[0]}", path,
                              START_FLAGS[start_name], BUDGETS[budget.split()[0]], args.peer == "torchao-sym")
        else:
            run = {} if budget == "ptq" else train_row(args.model, start, path, budget)
        ready.append((budget, path, run))
        if budget == "ptq" and len(pending) > 1:
            continue
        models = [load(p)[0] for _, p, _ in ready]
        results = evaluate_models(models, setup.windows, bos_id=setup.bos_id, reference=setup.reference)
        del models
        for (name, _, run), result in zip(ready, results):
            flags = run.get("flags") or " ".join(BUDGETS.get(name, []))
            row = {"setting": args.setting, "start": run.get("start", start_method), "budget": name, "flags": flags,
                   "train_seconds": run.get("seconds", {}).get("total", 0.0),
                   "wall_seconds": run.get("wall_seconds", 0.0), "peak_rss_bytes": run.get("peak_rss_bytes", 0),
                   "heldout_kl": run.get("heldout_kl", []), "heldout_seconds": run.get("heldout_seconds", []),
                   "command": run.get("command", ""), **result.to_dict()}
            rows = [r for r in rows if (r["setting"], r["budget"]) != (args.setting, name)] + [row]
            made.add((args.setting, name))
        ready = []
        rows = save(rows)
    written = json.loads(out_json.read_text())["rows"] if out_json.is_file() else rows
    if not any(r["setting"] == "float" for r in written):  # the float model's perplexity, once per results file
        result = evaluate_models([setup.reference], setup.windows, bos_id=setup.bos_id, reference=setup.reference)[0]
        rows = [*written, {"setting": "float", "start": "-", "budget": "-", "flags": "", "train_seconds": 0.0,
                           "wall_seconds": 0.0, "peak_rss_bytes": 0, **result.to_dict()}]
        made.add(("float", "-"))  # another run may add one meanwhile: save keeps this one only
        rows = save(rows)
    print(markdown({**setup.meta, "common_flags": " ".join(COMMON), "rows": rows}))


def markdown(data: dict) -> str:
    lines = [(f"{data['model']}: QAT from a PTQ checkpoint; WikiText-2 test, {data['windows']} x {data['seqlen']} "
              f"tokens, KL to float; training text WikiText-2 valid; `{data['command']}`; flags of every run: "
              f"`{data['common_flags']}`"), "",
             "| setting | start | budget | train flags | train s | wall s | peak RSS MiB | ppl | ppl vs float | KL | top-1 |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    base = next((r["ppl"] for r in data["rows"] if r["setting"] == "float"), None)
    for r in data["rows"]:
        rel = "-" if base is None else f"{100 * (r['ppl'] / base - 1):+.2f}%"
        lines.append(f"| {r['setting']} | {r['start']} | {r['budget']} | `{r['flags']}` | {r['train_seconds']:.0f} | "
                     f"{r['wall_seconds']:.0f} | {r['peak_rss_bytes'] / 2**20:.0f} | {r['ppl']:.3f} | {rel} | "
                     f"{r['kld']:.4f} | {r['top1']:.3f} |")
    curves = [r for r in data["rows"] if r.get("heldout_seconds")]
    if curves:
        lines += ["", "Held-out KL (2 windows of WikiText-2 valid, top-64 + tail) against the trainer's clock:", ""]
        for r in curves:
            points = ", ".join(f"{kl:.3f} at {t:.0f} s" for (_, _, kl), t in zip(r["heldout_kl"], r["heldout_seconds"]))
            lines.append(f"- {r['setting']} {r['budget']}: {points}")
    lines += ["", "train s: the trainer's own clock (teacher top-k passes and both stages); wall s: the child "
              "process from start to checkpoint written (loading included). ptq: the start checkpoint itself."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

"""QLoRA on Tiny Shakespeare versus the same LoRA on the float32 base (issue 5, part 5).

    python bench/qlora.py --model smollm2-135m [--steps 200]

Each base runs in a fresh process (``--run nf4|fp32``) so that its peak memory is its own: held-out
Shakespeare perplexity (the last 10% of the text, never trained on) and WikiText-2 raw test
perplexity before and after training, time per step, peak resident memory (VmHWM) and optimizer
state. Same seed, batches, adapter shape and steps for both bases. Results:
bench/results/qlora_<model>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench" / "peers"))
from peer_common import proc_status

SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


def reset_peak() -> None:
    """Start VmHWM again from the current RSS (Linux >= 4.0), so a training peak excludes loading's."""
    Path("/proc/self/clear_refs").write_text("5")


def run(model: str, base: str, steps: int, seqlen: int, batch_size: int, eval_windows: int) -> dict:
    """One base: evaluate, train, evaluate; as a JSON-ready dict."""
    from lowbit.config import LowbitConfig
    from lowbit.evaluate.perplexity import evaluate_windows
    from lowbit.evaluate.text import default_eval_path, read_text, token_windows
    from lowbit.sources import needs_bos
    from lowbit.train import qlora

    torch.manual_seed(0)
    config = LowbitConfig(load_in_4bit=True, quant_type="nf4", double_quant=True, block_size=64) \
        if base == "nf4" else None
    rss_start = proc_status()["VmHWM"]
    model_, tokenizer = qlora.load_base(model, config)
    settings = qlora.TrainSettings(data=str(SHAKESPEARE), steps=steps, seqlen=seqlen, batch_size=batch_size,
                                   log_every=20)
    peft_model = qlora.add_lora(model_, qlora.LoraSettings())
    bos = tokenizer.bos_token_id if needs_bos(tokenizer) else None
    _, heldout = qlora.split_windows(qlora.read_training_text(SHAKESPEARE), tokenizer, seqlen, settings.holdout)
    wiki = token_windows(read_text(default_eval_path()), tokenizer, seqlen, eval_windows)

    def scores() -> dict:
        return {"shakespeare_ppl": evaluate_windows(peft_model, heldout[:eval_windows], bos_id=bos, progress=False).ppl,
                "wikitext_ppl": evaluate_windows(peft_model, wiki, bos_id=bos, progress=False).ppl}

    before = scores()
    load_peak = proc_status()["VmHWM"]
    reset_peak()
    start = time.perf_counter()
    report = qlora.train(peft_model, tokenizer, settings)
    train_seconds = time.perf_counter() - start
    after = scores()
    return {"base": base, "before": before, "after": after, "train_seconds": train_seconds,
            "load_peak_rss_bytes": load_peak, "train_peak_rss_bytes": proc_status()["VmHWM"], "start_rss_bytes": rss_start,
            "heldout_windows": min(eval_windows, len(heldout)), **report.to_dict()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--run", choices=["nf4", "fp32"], help=argparse.SUPPRESS)  # internal: one base, as JSON
    args = ap.parse_args()
    knobs = (args.steps, args.seqlen, args.batch_size, args.eval_windows)
    if args.run:
        print(json.dumps(run(args.model, args.run, *knobs)))
        return
    rows = {}
    for base in ("nf4", "fp32"):
        cmd = [sys.executable, __file__, "--run", base, "--model", args.model, "--steps", str(args.steps),
               "--seqlen", str(args.seqlen), "--batch-size", str(args.batch_size),
               "--eval-windows", str(args.eval_windows)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows[base] = json.loads(out.strip().splitlines()[-1])
        print(json.dumps({k: v for k, v in rows[base].items() if k != "losses"}), flush=True)
    write_results(args, rows)


def write_results(args: argparse.Namespace, rows: dict) -> None:
    name = Path(args.model).name
    meta = {"command": " ".join(["python", "bench/qlora.py", *sys.argv[1:]]), "date": time.strftime("%Y-%m-%d"),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "steps": args.steps,
            "seqlen": args.seqlen, "batch_size": args.batch_size, "eval_windows": args.eval_windows,
            "lora": "r 16, alpha 32, dropout 0.05, q/k/v/o/gate/up/down", "lr": "2e-4 constant after 10 warmup"}
    results = ROOT / "bench" / "results"
    (results / f"qlora_{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [f"# QLoRA on Tiny Shakespeare: {name}", "",
             (f"`{meta['command']}` ({meta['date']}, torch {meta['torch']}). {args.steps} steps of "
             f"{args.batch_size} x {args.seqlen} tokens, LoRA {meta['lora']}, lr {meta['lr']}, seed 0. "
             f"Held-out: the last 10% of Tiny Shakespeare (first {args.eval_windows} windows); WikiText-2 raw test, "
             f"first {args.eval_windows} windows of {args.seqlen}."), "",
             ("Peak RSS: VmHWM of the process while training (reset after loading and the first evaluation), "
             "and while loading and evaluating; the process holds about "
             f"{rows['nf4']['start_rss_bytes'] / 2**20:.0f} MiB of libraries before the model."), "",
             ("| base | Shakespeare ppl before -> after | WikiText-2 ppl before -> after | s/step | "
             "training peak RSS (MiB) | load+eval peak (MiB) | optimizer state (MiB) | trainable params |"),
             "|---|---|---|---|---|---|---|---|"]
    for base, r in rows.items():
        lines.append(f"| {base} | {r['before']['shakespeare_ppl']:.2f} -> {r['after']['shakespeare_ppl']:.2f} | "
                     f"{r['before']['wikitext_ppl']:.2f} -> {r['after']['wikitext_ppl']:.2f} | "
                     f"{r['seconds_per_step']:.2f} | {r['train_peak_rss_bytes'] / 2**20:.0f} | "
                     f"{r['load_peak_rss_bytes'] / 2**20:.0f} | "
                     f"{r['optimizer_state_bytes'] / 2**20:.1f} | {r['trainable_params']:,} |")
    (results / f"qlora_{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Seconds per QAT training step in float32 and under bfloat16 autocast (``lowbit train --compute-dtype``).

One process, one thread, the same start checkpoint and window: the student is ``prepare_qat``'s
model of a PTQ checkpoint with its weights and step sizes learning (full QAT, as ``bench/qat.py``'s
budgets); a step is the forward and backward of one 512-token window of WikiText-2 valid on the
top-64 KL to the float teacher, with gradient checkpointing as ``lowbit train`` runs it. Each mode
runs ``--repeats`` steps after one warm-up step, alternating modes; the table gives the median,
the loss of each mode's first step and the relative difference of their weight gradients.

Run: ``python bench/qat_step_time.py --start out/bench/smollm2-135m/gptq-mse-int3-g64``. Prints a
markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--start", required=True, help="a lowbit checkpoint (the student)")
    ap.add_argument("--teacher", default="smollm2-135m")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)

    from lowbit.api import load
    from lowbit.pipeline.calibration import calibration_windows
    from lowbit.train.distill import kl_topk, teacher_topk
    from lowbit.train.qat import QatSettings, _autocast, _optimizer
    from lowbit.train.qat_linear import prepare_qat, qat_layers

    teacher, tokenizer = load(args.teacher)[:2]
    student = load(args.start)[0]
    ids = calibration_windows(tokenizer, samples=1, seqlen=512, seed=0)
    target = teacher_topk(teacher, ids, 64)
    del teacher
    prepare_qat(student)
    optimizer = _optimizer(list(qat_layers(student).values()), 3e-3, 1e-4)
    weights = optimizer.param_groups[1]["params"]
    student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    student.train()

    def step(mode: str) -> tuple[float, float, torch.Tensor]:
        start = time.perf_counter()
        with _autocast(student, QatSettings(compute_dtype=mode)):  # as lowbit train runs a step
            logits = student(input_ids=target.ids, use_cache=False).logits
        loss = kl_topk(target.logprobs, target.index, logits)
        loss.backward()
        seconds = time.perf_counter() - start
        grad = torch.cat([p.grad.flatten() for p in weights])
        optimizer.zero_grad(set_to_none=True)
        return seconds, loss.item(), grad

    modes = ("float32", "bfloat16")
    first = {m: step(m) for m in modes}  # warm-up; its loss and gradient are kept for the comparison
    times = {m: [] for m in modes}
    for _ in range(args.repeats):
        for m in modes:
            times[m].append(step(m)[0])
    g32, g16 = first["float32"][2], first["bfloat16"][2]
    rel = float((g16 - g32).norm() / g32.norm())
    print(f"{args.start}: one 512-token step, one thread, median of {args.repeats}\n")
    print("| compute dtype | s/step | speed-up | loss | weight-gradient difference vs float32 |")
    print("|---|---:|---:|---:|---:|")
    base = statistics.median(times["float32"])
    for m in modes:
        t = statistics.median(times[m])
        print(f"| {m} | {t:.2f} | {base / t:.2f}x | {first[m][1]:.5f} | {0.0 if m == 'float32' else rel:.3f} |")


if __name__ == "__main__":
    sys.exit(main())

"""torchao's quantization-aware training on the same distillation run as ``lowbit train``'s e2e stage.

Runs inside the GPTQModel venv made by bench/peers/setup.sh (out/peers/gptqmodel, which pins
torchao 0.18.0); never imports lowbit. torchao's QAT is ``quantize_(model, QATConfig(weight_config=
IntxFakeQuantizeConfig(torch.intN, group_size=G, is_symmetric=...), step="prepare"))``: every block
Linear becomes a ``FakeQuantizedLinear`` whose weight is fake-quantized in each forward with scales
and zero-points computed from the current weight (its default, ``is_dynamic=True``), and the float
weights train through the straight-through rounding. lm_head and the embeddings stay float, as in
lowbit's checkpoints.

Same run as lowbit's, so that only the quantizer differs:
- the windows and the teacher are the ones ``lowbit train`` cached (``--teacher-cache``: its
  ``teacher_topk.safetensors``, the token ids with the float teacher's top-k log-probabilities);
- the loss is the same: KL(teacher || student) over the teacher's top k tokens plus one tail bucket;
- the windows of each step follow the trainer's order (epochs of ``randperm`` from ``seed + 1``);
- Adam, a cosine learning-rate schedule without warm-up over ``--steps``, gradient checkpointing.

Written to ``--out``: a float32 Hugging Face model whose Linear weights are torchao's fake-quantized
weights after training (the values its ``step="convert"`` would store), plus ``peer.json``.

Usage (inside out/peers/gptqmodel):
  python bench/peers/qat_torchao.py --model DIR --teacher-cache STATE/teacher_topk.safetensors \
      --bits 3 --group-size 64 --asym --steps 64 --lr 1e-5 --out OUTDIR
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from importlib.metadata import version
from pathlib import Path

from peer_common import copy_tokenizer, peak_rss_bytes, write_report  # this directory (sys.path[0])


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="float32 Hugging Face model directory")
    ap.add_argument("--teacher-cache", required=True, help="lowbit train's teacher_topk.safetensors (ids, logprobs, index)")
    ap.add_argument("--bits", type=int, choices=(2, 3, 4, 8), default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--sym", dest="sym", action="store_true", default=True)
    ap.add_argument("--asym", dest="sym", action="store_false")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--lr", type=float, required=True, help="Adam learning rate of the weights (cosine to 0)")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.steps < 1 or not args.lr > 0:
        ap.error("--steps must be >= 1 and --lr > 0")
    return args


def batch_order(n: int, steps: int, batch_size: int, seed: int):
    """The trainer's order: epochs of shuffled windows drawn from ``seed + 1``, cut into steps."""
    import torch

    generator = torch.Generator().manual_seed(seed + 1)
    flat = torch.cat([torch.randperm(n, generator=generator) for _ in range(-(-steps * batch_size // n))])
    return [flat[s * batch_size:(s + 1) * batch_size] for s in range(steps)]


def kl_topk(teacher_logprobs, teacher_index, student_logits):
    """lowbit's loss (lowbit/train/distill.py): KL over the teacher's top k tokens plus one bucket for the rest."""
    import torch
    import torch.nn.functional as F

    s = F.log_softmax(student_logits.float(), dim=-1).gather(-1, teacher_index.long())
    p = teacher_logprobs.exp()
    top = (p * (teacher_logprobs - s)).sum(-1)
    p_rest = (1 - p.sum(-1)).clamp_min(0)
    q_rest = (1 - s.exp().sum(-1)).clamp_min(1e-12)
    rest = torch.where(p_rest > 0, p_rest * (torch.log(p_rest.clamp_min(1e-12)) - torch.log(q_rest)), 0.0)
    return (top + rest).mean()


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch
    from safetensors.torch import load_file
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig
    from transformers import AutoModelForCausalLM

    torch.manual_seed(args.seed)
    cache = load_file(args.teacher_cache)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    dtype = {2: torch.int2, 3: torch.int3, 4: torch.int4, 8: torch.int8}[args.bits]
    config = IntxFakeQuantizeConfig(dtype, group_size=args.group_size, is_symmetric=args.sym)
    block_linear = (lambda m, fqn: isinstance(m, torch.nn.Linear) and fqn.startswith("model.layers."))
    quantize_(model, QATConfig(weight_config=config, step="prepare"), filter_fn=block_linear)
    fake = {n: m for n, m in model.named_modules() if hasattr(m, "weight_fake_quantizer")}
    for p in model.parameters():
        p.requires_grad_(False)
    weights = [m.weight for m in fake.values()]
    for w in weights:
        w.requires_grad_(True)
    optimizer = torch.optim.Adam(weights, lr=args.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / max(1, args.steps))))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    ids, logprobs, index = cache["ids"], cache["logprobs"], cache["index"]
    order = batch_order(len(ids), args.steps, args.batch_size, args.seed)
    losses = []
    t0 = time.perf_counter()
    for step, batch in enumerate(order):
        loss = kl_topk(logprobs[batch], index[batch], model(input_ids=ids[batch], use_cache=False).logits)
        if not math.isfinite(loss.item()):
            raise SystemExit(f"torchao QAT: loss became {loss.item()} at step {step}")
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        print(json.dumps({"step": step + 1, "loss": round(losses[-1], 5), "seconds": round(time.perf_counter() - t0, 1)}),
              flush=True)
    seconds = time.perf_counter() - t0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plain = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    with torch.no_grad():
        for name, module in fake.items():
            plain.get_submodule(name).weight.copy_(module.weight_fake_quantizer(module.weight))
    plain.save_pretrained(out)
    copy_tokenizer(args.model, out)
    write_report(out, {
        "tool": "torchao", "version": version("torchao"), "torch": torch.__version__, "python": platform.python_version(),
        "method": f"QAT IntxFakeQuantizeConfig(int{args.bits}, group_size={args.group_size}, "
                  f"is_symmetric={args.sym}), weights trained, Adam lr {args.lr} cosine, {args.steps} steps",
        "fake_quantized_linears": len(fake), "losses": losses, "quantize_seconds": seconds,
        "peak_rss_bytes": peak_rss_bytes(), "threads": torch.get_num_threads(),
        "notes": [f"{len(fake)} block Linear layers fake-quantized; lm_head and embeddings float",
                  f"training {seconds:.0f} s for {args.steps} steps of {args.batch_size} x {ids.shape[1]} tokens"]})


if __name__ == "__main__":
    main()

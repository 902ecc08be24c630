"""GPTQ with GPTQModel (ModelCloud), written back as a float32 Hugging Face model.

Runs inside the venv made by bench/peers/setup.sh (out/peers/gptqmodel); never imports lowbit.
The model is loaded in float32 (GPTQModel's CPU default would be bfloat16) and quantized by
``GPTQModel.quantize`` (its layer-by-layer looper; each layer's inputs come from the already
quantized layers before it) on exactly the token windows of ``--calib`` (native order, no
concatenation, no padding, no extra tokens). GPTQModel packs each Linear into its GPTQ format
(``qweight``/``qzeros`` int32, ``scales`` float16, ``g_idx``); this script unpacks those in float32,
``W = scales[g_idx] * (code - zero[g_idx])``, checks the result against the tool's own
``dequantize_weight()`` and its forward, and copies the weights into a fresh load of the original
float model, saved to ``--out`` with a ``peer.json`` beside it. lm_head is not quantized.

Option mapping (GPTQModel 7.6.0 ``QuantizeConfig`` defaults in brackets):
  --bits/--group-size/--sym  -> bits [4], group_size [128], sym [True]
  --act-order                -> desc_act=True, static_groups=True, act_group_aware=False
                                (columns in decreasing diag(H) order; group scales fixed from the
                                original weights, natural group layout like lowbit's act_order)
  --no-act-order             -> desc_act=False, static_groups=False, act_group_aware=False
                                [desc_act False, static_groups False, act_group_aware True: by
                                default GPTQModel reorders columns group-aware ("GAR"); turned
                                off here to get plain GPTQ]
  --damp                     -> damp_percent [0.05], fraction of mean diag(H);
                                damp_auto_increment stays [0.01] (added on a failed Cholesky)
  mse                        -> 0.0 [0.0]: min-max ranges, no clipping search
  block size                 -> 128 (GPTQModel's fixed blocksize)

Usage (inside out/peers/gptqmodel, with GPTQMODEL_CPU_WORKERS=2):
  python bench/peers/run_gptqmodel.py --model DIR --calib calib.safetensors --bits 4 \
      --group-size 64 --sym --no-act-order --damp 0.01 --out OUTDIR
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import warnings
from importlib.metadata import version
from pathlib import Path

from peer_common import (  # this directory (sys.path[0])
    copy_tokenizer,
    load_ids,
    peak_rss_bytes,
    write_report,
)
from peer_common import parse_args as common_parse_args


def parse_args(argv=None) -> argparse.Namespace:
    return common_parse_args(__doc__.split("\n")[0], argv)


def _capture_logbar_warnings(sink: list[str]) -> None:
    """Record GPTQModel's own WARN/ERROR lines (it logs through logbar, not ``warnings``)."""
    import contextlib
    import logging

    try:
        from logbar import LogBar
    except ImportError:
        return
    original = LogBar._process

    def _process(self, level, msg, *a, **k):
        with contextlib.suppress(Exception):  # never break the tool's logging
            if self._normalize_level(level) >= logging.WARNING:
                sink.append(str(self._format_message(msg, a)).strip())
        return original(self, level, msg, *a, **k)

    LogBar._process = _process


def unpack_codes(qweight, qzeros, bits: int, in_features: int, out_features: int):
    """Integer codes ``[in, out]`` and zero points ``[groups, out]`` of GPTQ's int32 packing
    (``qweight [in*bits/32, out]``, ``qzeros [groups, out*bits/32]``, codes LSB first; for 3 bits
    every 3 words hold 32 codes as one 96-bit little-endian bit stream)."""
    import torch

    def unpack(words, dim):  # words int32, codes packed along `dim`
        w = words.to(torch.int64) & 0xFFFFFFFF
        if bits in (2, 4, 8):
            per = 32 // bits
            shifts = torch.arange(per, dtype=torch.int64) * bits
            if dim == 0:
                c = (w.unsqueeze(1) >> shifts.view(1, -1, 1)) & ((1 << bits) - 1)  # [rows, per, cols]
                return c.reshape(-1, w.shape[1])
            c = (w.unsqueeze(2) >> shifts.view(1, 1, -1)) & ((1 << bits) - 1)  # [rows, cols, per]
            return c.reshape(w.shape[0], -1)
        # bits == 3: every 3 words hold 32 codes as one 96-bit little-endian bit stream
        if dim == 0:
            w = w.T
        rows, cols = w.shape
        w = w.reshape(rows, cols // 3, 3)
        codes = []
        for k in range(32):
            word, off = divmod(3 * k, 32)
            v = w[..., word] >> off
            if off > 29:  # straddles into the next word
                v = v | (w[..., word + 1] << (32 - off))
            codes.append(v & 7)
        c = torch.stack(codes, dim=-1).reshape(rows, -1)
        return c.T if dim == 0 else c

    codes = unpack(qweight, 0)[:in_features]
    zeros = unpack(qzeros, 1)[:, :out_features]
    return codes, zeros


def main(argv=None) -> None:
    args = parse_args(argv)
    for a in ("model", "calib", "out"):
        setattr(args, a, str(Path(getattr(args, a)).expanduser().resolve()))
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    import torch
    from transformers import AutoModelForCausalLM

    tool_warnings: list[str] = []
    _capture_logbar_warnings(tool_warnings)
    from gptqmodel import GPTQModel, QuantizeConfig
    from gptqmodel.utils.model import convert_gptq_v1_to_v2_format_module

    notes: list[str] = []
    ids = load_ids(args.calib)
    samples, seqlen = ids.shape
    calib = [{"input_ids": row[None].clone(), "attention_mask": torch.ones(1, seqlen, dtype=torch.long)} for row in ids]

    qcfg = QuantizeConfig(
        bits=args.bits, group_size=args.group_size, sym=args.sym,
        desc_act=args.act_order, static_groups=args.act_order, act_group_aware=False,
        damp_percent=args.damp, mse=0.0, lm_head=False, device="cpu",
        offload_to_disk=False,  # [True]: finished layers go to a temp dir as meta tensors; keep them in RAM
    )
    tool_settings = {k: getattr(qcfg, k) for k in ("bits", "group_size", "sym", "desc_act", "static_groups",
                                                   "act_group_aware", "damp_percent", "damp_auto_increment",
                                                   "mse", "true_sequential", "lm_head", "offload_to_disk")}
    tool_settings = {k: (v if isinstance(v, (bool, int, float, str, type(None))) else str(v))
                     for k, v in tool_settings.items()}
    tool_settings["fallback"] = str(getattr(qcfg, "fallback", None))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.chdir(out)  # GPTQModel writes its per-run quantization log to ./logs/
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qmodel = GPTQModel.load(args.model, qcfg, dtype=torch.float32)
        tool_dtype = str(next(qmodel.model.parameters()).dtype)
        t0 = time.perf_counter()
        quant_log = qmodel.quantize(calib, batch_size=1, calibration_sort=None)
        quantize_seconds = time.perf_counter() - t0
    rss = peak_rss_bytes()
    tool_warnings = list(dict.fromkeys(tool_warnings + [f"{w.category.__name__}: {w.message}" for w in caught]))
    notes.append(f"model dtype inside GPTQModel during quantization: {tool_dtype}")

    # Unpack every packed layer to float32 weights [out, in].
    qweights: dict[str, torch.Tensor] = {}
    max_tool_dequant_diff = max_forward_rel = 0.0
    scale_dtype = kernel = None
    v1_converted = 0
    gen = torch.Generator().manual_seed(0)
    for name, module in qmodel.model.named_modules():
        if not hasattr(module, "qweight") or not hasattr(module, "scales"):
            continue
        kernel = type(module).__name__
        scale_dtype = str(module.scales.dtype)
        # Right after quantize() the packer has left zero points in the GPTQ v1 checkpoint layout
        # (stored zero - 1, subtracted word-wise); GPTQModel converts to v2 (true zeros) only when a
        # checkpoint is loaded, and its torch kernel assumes v2. Convert with the tool's own function.
        if module.qzero_format() == 1:
            convert_gptq_v1_to_v2_format_module(module, bits=module.bits, pack_dtype=module.pack_dtype)
            v1_converted += 1
        codes, zeros = unpack_codes(module.qweight, module.qzeros, args.bits, module.in_features, module.out_features)
        g_idx = module.g_idx.long()
        W = (module.scales.float()[g_idx] * (codes.float() - zeros.float()[g_idx])).T.contiguous()
        qweights[f"{name}.weight"] = W
        with torch.no_grad():
            try:
                # the tool dequantizes in float16: compare with our float32 values rounded to float16
                ref = module.dequantize_weight().float().T
                max_tool_dequant_diff = max(max_tool_dequant_diff, (ref - W.half().float()).abs().max().item())
            except Exception as exc:  # noqa: BLE001 - a check, not the result
                notes.append(f"dequantize_weight() unavailable on {kernel}: {exc!r}")
            x = torch.randn(4, module.in_features, generator=gen)
            y_tool = module(x).float()
            y_ours = torch.nn.functional.linear(x, W, None if module.bias is None else module.bias.float())
            max_forward_rel = max(max_forward_rel, ((y_tool - y_ours).abs().max() / y_ours.abs().max()).item())
    if not qweights:
        sys.exit("GPTQModel packed no layer (no module with qweight/scales found)")
    notes.append(f"{len(qweights)} layers packed as {kernel} ({v1_converted} with v1 zero points, converted to v2 "
                 "with gptqmodel's convert_gptq_v1_to_v2_format_module before unpacking); "
                 f"scales stored as {scale_dtype}; "
                 f"max |tool dequantize_weight() (float16) - float16(ours)| = {max_tool_dequant_diff:.3g}; "
                 f"max relative |tool layer forward - x @ W^T| = {max_forward_rel:.3g}")

    out_model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    out_model.eval()
    sd = out_model.state_dict()
    missing = set(qweights) - set(sd)
    if missing:
        sys.exit(f"names not in the fresh model: {sorted(missing)[:5]}")
    with torch.no_grad():
        for k, w in qweights.items():
            if tuple(sd[k].shape) != tuple(w.shape):
                sys.exit(f"{k}: unpacked shape {tuple(w.shape)} != model's {tuple(sd[k].shape)}")
            sd[k].copy_(w)
        # Whole-model check: the tool's quantized model vs the float model carrying our weights.
        probe = ids[:1, : min(seqlen, 128)]
        try:
            tool_logits = qmodel.model(input_ids=probe).logits.float()
            our_logits = out_model(probe).logits.float()
            diff = (tool_logits - our_logits).abs().max().item()
            notes.append(f"max |logits(tool model) - logits(--out model)| on a {probe.shape[1]}-token probe "
                         f"= {diff:.3g} "
                         f"(max |logit| {our_logits.abs().max().item():.3g})")
        except Exception as exc:  # noqa: BLE001
            notes.append(f"whole-model forward check skipped: {exc!r}")
        # Non-quantized tensors must be untouched.
        tool_sd = qmodel.model.state_dict()
        changed = [k for k, v in sd.items() if k not in qweights and k in tool_sd
                   and tool_sd[k].shape == v.shape and not torch.equal(tool_sd[k].float(), v.float())]
        if changed:
            notes.append(f"non-quantized tensors differ in the tool's model (not copied): {changed[:8]}")

    out_model.save_pretrained(out)
    copy_tokenizer(args.model, out)

    report = {
        "tool": "gptqmodel",
        "version": version("gptqmodel"),
        "versions": {p: version(p) for p in ("gptqmodel", "torch", "transformers")},
        "torch": torch.__version__,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "env": {"GPTQMODEL_CPU_WORKERS": os.environ.get("GPTQMODEL_CPU_WORKERS")},
        "model": str(Path(args.model).resolve()),
        "calib": {"file": str(Path(args.calib).resolve()), "samples": samples, "seqlen": seqlen},
        "settings": {
            "bits": args.bits, "group_size": args.group_size, "sym": args.sym, "act_order": args.act_order,
            "damp": args.damp, "block_size": 128, "lm_head": "float (not quantized)",
            "tool_args": tool_settings | {"dtype": "float32", "batch_size": 1, "calibration_sort": None},
        },
        "quantize_seconds": quantize_seconds,
        "peak_rss_bytes": rss,
        "dequantized_from": "packed qweight/qzeros/scales(float16)/g_idx, unpacked in float32",
        "warnings": tool_warnings,
        "notes": notes,
        "tool_log_keys": sorted(quant_log) if isinstance(quant_log, dict) else None,
    }
    write_report(out, report)


if __name__ == "__main__":
    main()

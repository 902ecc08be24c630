"""W8A8 (int8 weights, int8 dynamic per-token or static per-tensor activations) with llm-compressor.

Runs inside the venv made by bench/peers/setup.sh (out/peers/llmcompressor); never imports the lowbit
package. Called by ``run_peers()`` in bench/activations.py; writes one table row as JSON.

Recipe: llm-compressor's documented W8A8 example, ``SmoothQuantModifier(smoothing_strength=0.5)``
then ``GPTQModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"])`` (every other option at
its default), through ``oneshot`` with the sequential pipeline, batch size 1, on exactly the token
windows of ``--calib`` (no shuffling, truncation or padding). compressed-tensors' ``W8A8`` preset is
int8 symmetric per-output-channel weights (static scales) and int8 symmetric per-token dynamic input
activations. ``oneshot`` leaves every quantized Linear with a forward wrapper that fake-quantizes
(quantize-dequantize) its input per token on every call and its weight with the stored scale: the
model is evaluated as it is left in memory, with that wrapper active, by lowbit's
``lowbit/evaluate/perplexity.py`` (loaded by path) against a fresh float32 load of ``--model``.

Self-checks (in ``notes``): the wrapper and its scheme are attached and enabled on every quantized
Linear; the matmul inputs of the tool's forward hold at most 256 distinct values per token; its
logits differ from the same model with quantization disabled and equal those of an independent
re-implementation (per-token int8 qdq of each Linear input, weights as stored).

``--static``: the same recipe with the W8A8 preset's input activations made static: one symmetric
int8 scale per tensor (``strategy="tensor"``, ``dynamic=False``), which compressed-tensors'
observer calibrates during ``oneshot`` and stores as each Linear's ``input_scale``; the
re-implementation then quantizes each input with that stored scale.

Usage (inside out/peers/llmcompressor):
  python bench/peers/w8a8_llmcompressor.py --model DIR --calib calib.safetensors \
      --windows windows.safetensors --out result.json [--bos-id N] [--static]
"""

from __future__ import annotations

import logging
import platform
import sys
from importlib.metadata import version

from peer_common import (  # this directory (sys.path[0])
    capture_loguru_warnings,
    llmcompressor_oneshot,
    load_ids,
    parse_w8a8_args,
    score_against_float,
    write_row,
)


def _v(x):
    """An enum's value, or the value itself (compressed-tensors stores some enums as plain strings)."""
    return getattr(x, "value", x)


def main(argv=None) -> None:
    args = parse_w8a8_args(__doc__.split("\n")[0], argv, static_option=True)
    import torch
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationScheme,
        QuantizationStatus,
        disable_quantization,
        enable_quantization,
        fake_quantize,
        preset_name_to_scheme,
    )
    from llmcompressor.modifiers.quantization import GPTQModifier
    from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    notes: list[str] = []
    qdq = "static per-tensor (the stored input_scale)" if args.static else "per-token"
    tool_warnings = capture_loguru_warnings()
    ids = load_ids(args.calib)
    windows = load_ids(args.windows)
    samples, seqlen = ids.shape

    preset = preset_name_to_scheme("W8A8", ["Linear"])
    if args.static:
        preset = QuantizationScheme(targets=["Linear"], weights=preset.weights, input_activations=QuantizationArgs(
            num_bits=8, type="int", strategy="tensor", symmetric=True, dynamic=False))
    w_args, a_args = preset.weights, preset.input_activations
    notes.append(f"compressed-tensors {'W8A8 weights, static per-tensor inputs' if args.static else 'preset W8A8'}: weights {w_args.num_bits}-bit {_v(w_args.type)} "
                 f"{_v(w_args.strategy)} symmetric={w_args.symmetric} dynamic={w_args.dynamic}; input "
                 f"activations {a_args.num_bits}-bit {_v(a_args.type)} {_v(a_args.strategy)} "
                 f"symmetric={a_args.symmetric} dynamic={a_args.dynamic}; no output activation quantization")
    recipe = [
        SmoothQuantModifier(smoothing_strength=0.5),
        GPTQModifier(config_groups={"group_0": preset}, ignore=["lm_head"]) if args.static
        else GPTQModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"]),
    ]
    gptq_args = "config_groups={group_0: the scheme above}" if args.static else "targets='Linear', scheme='W8A8'"
    notes.append("recipe: SmoothQuantModifier(smoothing_strength=0.5) [mappings inferred: the default "
                 "Llama-style ones, input_layernorm -> q/k/v_proj and post_attention_layernorm -> "
                 "gate/up_proj; o_proj and down_proj are not smoothed; per-channel activation range is "
                 f"max - min over the calibration tokens], then GPTQModifier({gptq_args}"
                 f", ignore=['lm_head']) with its defaults (block_size {recipe[1].block_size}, "
                 f"dampening_frac {recipe[1].dampening_frac}, actorder resolved below)")
    notes.append(f"oneshot: pipeline='sequential', batch_size=1, {samples}x{seqlen} calibration tokens, "
                 "shuffle_calibration_samples=False")

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.eval()
    model, quantize_seconds, caught = llmcompressor_oneshot(model, AutoTokenizer.from_pretrained(args.model), recipe,
                                                            ids)
    tool_warnings = list(dict.fromkeys(tool_warnings + caught))
    model.eval()

    # 1. The scheme, status and forward wrapper of every quantized Linear.
    quantized: dict[str, torch.nn.Linear] = {}
    problems: list[str] = []
    wrapping: set[str] = set()
    max_requant_diff = 0.0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is None:
            continue
        quantized[name] = module
        ia, wa = scheme.input_activations, scheme.weights
        strategy = "tensor" if args.static else "token"
        if not (ia and ia.num_bits == 8 and _v(ia.type) == "int" and _v(ia.strategy) == strategy
                and ia.symmetric and ia.dynamic is (not args.static)):
            problems.append(f"{name}: input_activations {ia}")
        if not (wa and wa.num_bits == 8 and _v(wa.strategy) == "channel" and wa.symmetric):
            problems.append(f"{name}: weights {wa}")
        if getattr(module, "quantization_status", None) != QuantizationStatus.FROZEN:
            problems.append(f"{name}: status {getattr(module, 'quantization_status', None)}")
        if getattr(module, "quantization_enabled", True) is not True:
            problems.append(f"{name}: quantization_enabled={module.quantization_enabled}")
        # set_forward_quantized binds a functools.wraps'ed closure (named "forward"; its code is named
        # quantized_forward); compressed-tensors' offloading may wrap it again, keeping it in
        # _original_forward_func.
        forward_func = getattr(module, "_original_forward_func", None) or getattr(module.forward, "__func__", None)
        wrapping.add("offload wrapper -> quantized_forward" if hasattr(module, "_original_forward_func")
                     else "quantized_forward")
        if getattr(getattr(forward_func, "__code__", None), "co_name", "") != "quantized_forward":
            problems.append(f"{name}: forward is not compressed-tensors' quantized_forward ({module.forward!r})")
        w = module.weight.detach().float()
        rq = fake_quantize(w, module.weight_scale.float(), getattr(module, "weight_zero_point", None), wa)
        max_requant_diff = max(max_requant_diff, (rq - w).abs().max().item())
    if not quantized:
        sys.exit("llmcompressor quantized no Linear layer")
    if problems:
        sys.exit("unexpected quantization state after oneshot:\n" + "\n".join(problems[:20]))
    first = next(iter(quantized.values())).quantization_scheme
    unquantized = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in quantized]
    notes.append(f"after oneshot: {len(quantized)} Linear layers carry scheme input_activations="
                 f"int8/{_v(first.input_activations.strategy)}/symmetric/dynamic={first.input_activations.dynamic} "
                 f"(observer {first.input_activations.observer}) and weights=int8/channel/symmetric (actorder "
                 f"{_v(first.weights.actorder)}, observer {first.weights.observer}), status FROZEN, "
                 f"quantization_enabled=True, forward = {sorted(wrapping)}; "
                 f"not quantized: {unquantized}")
    notes.append(f"weights: max |fake_quantize(w) - w| = {max_requant_diff:.3g} (GPTQ left the weights on "
                 f"their int8 grid; scale dtype {next(iter(quantized.values())).weight_scale.dtype}); the "
                 f"forward re-applies that (idempotent) weight qdq and {qdq} int8 qdq of the input "
                 f"(scale = max|x| / 127.5 {'as calibrated' if args.static else 'of the token'}, codes clamped "
                 "to [-128, 127]) in float32")

    # 2. What actually reaches the matmuls, and the logits with / without / re-implemented.
    probe = windows[:1, : min(windows.shape[1], 128)]
    if args.bos_id is not None:
        probe = torch.cat([torch.full((1, 1), args.bos_id, dtype=probe.dtype), probe], dim=1)
    linear_forward = torch.nn.Linear.forward
    distinct: list[int] = []

    def counting_forward(self, x):  # the class forward, called by quantized_forward with its qdq input
        if self in quantized_set:
            flat = x.detach().reshape(-1, x.shape[-1])
            distinct.append(int(((flat.sort(dim=-1).values.diff(dim=-1) != 0).sum(-1) + 1).max()))
        return linear_forward(self, x)

    quantized_set = set(quantized.values())

    def logits_and_distinct():
        distinct.clear()
        torch.nn.Linear.forward = counting_forward
        try:
            with torch.inference_mode():
                out = model(probe, use_cache=False).logits.float()
        finally:
            torch.nn.Linear.forward = linear_forward
        return out, max(distinct) if distinct else -1

    def manual_act_qdq(module, inputs):
        x = inputs[0]
        scale = module.input_scale.float() if args.static else x.abs().amax(dim=-1, keepdim=True) / 127.5
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        return (torch.clamp(torch.round(x / scale), -128, 127) * scale,)

    tool_logits, tool_distinct = logits_and_distinct()
    model.apply(disable_quantization)
    off_logits, off_distinct = logits_and_distinct()
    hooks = [m.register_forward_pre_hook(manual_act_qdq) for m in quantized.values()]
    manual_logits, _ = logits_and_distinct()
    for h in hooks:
        h.remove()
    model.apply(enable_quantization)
    again_logits, _ = logits_and_distinct()
    scale = tool_logits.abs().max().item()
    d_off = (tool_logits - off_logits).abs().max().item()
    d_manual = (tool_logits - manual_logits).abs().max().item()
    d_again = (tool_logits - again_logits).abs().max().item()
    notes.append(f"activation check on a {probe.shape[1]}-token probe: the inputs the tool's forward passes "
                 f"to the Linear matmuls hold at most {tool_distinct} distinct values per token (with "
                 f"quantization disabled: {off_distinct}); max |logits| = {scale:.3g}; max |logits(tool) - "
                 f"logits(quantization disabled, i.e. W8 weight-only)| = {d_off:.3g}; max |logits(tool) - "
                 f"logits(own {qdq} int8 qdq of every Linear input, weights as stored)| = {d_manual:.3g}; "
                 f"re-enabled vs first forward: {d_again:.3g}")
    # Fail only when the activations are plainly not quantized; a re-implementation mismatch (e.g. a
    # rounding tie decided differently) is reported, not fatal.
    if not (tool_distinct <= 256 and d_off > 0):
        sys.exit("activation quantization is not active in the tool's forward:\n" + notes[-1])
    if d_manual > 1e-3 * max(1.0, scale) or d_again != 0:
        notes.append(f"WARNING: the tool's forward is not reproduced by {qdq} int8 qdq of the inputs")
    else:
        notes.append(f"=> int8 {'static per-tensor' if args.static else 'per-token'} activation quantization is "
                     "active in the evaluated forward")

    # 3. Evaluate the model as the tool leaves it (quantization enabled) against the float model.
    result, reference = score_against_float(model, args.model, windows, args.bos_id)
    notes.append(f"evaluated with lowbit/evaluate/perplexity.py (by path) on {windows.shape[0]}x{windows.shape[1]} "
                 f"windows, bos_id={args.bos_id}, reference = fresh float32 load of --model; fake-quant "
                 f"(qdq) arithmetic in float32, not int8 kernels; torch threads {torch.get_num_threads()}")
    ref_sd, sd = reference.state_dict(), model.state_dict()
    norms = [k for k in ref_sd if "norm" in k and k in sd]
    smoothed = [k for k in norms if not torch.equal(sd[k].float(), ref_sd[k].float())]
    notes.append(f"SmoothQuant applied: {len(smoothed)} of {len(norms)} norm weights differ from the float "
                 f"model ({', '.join(k.split('.')[-2] for k in smoothed[:2])}, ...)")
    if tool_warnings:
        notes.append("tool warnings: " + " | ".join(tool_warnings[:10]))

    versions = {p: version(p) for p in ("llmcompressor", "compressed-tensors", "torch", "transformers")}
    row = {
        "setting": "W8A8 static per-tensor" if args.static else "W8A8 dynamic per-token",
        "method": "smoothquant+gptq",
        "acts": f"int8 static per-tensor ({first.input_activations.observer})" if args.static
        else "int8 dynamic per-token",
        "tool": f"llmcompressor {versions['llmcompressor']} (compressed-tensors {versions['compressed-tensors']})",
        "quantize_seconds": quantize_seconds,
        "bpw": None,
        **result,
        "notes": notes,
        "versions": versions,
        "python": platform.python_version(),
    }
    write_row(args.out, row)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main()

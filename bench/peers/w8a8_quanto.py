"""W8A8 (int8 weights, int8 static per-tensor activations) with optimum-quanto, evaluated in place.

Runs inside the venv made by ``bash bench/peers/setup.sh quanto`` (out/peers/quanto); never imports
the lowbit package. Called by ``run_peers()`` in bench/activations.py; writes one table row as JSON.

Recipe (quanto's documented flow): ``quantize(model, weights=qint8, activations=qint8,
exclude=["lm_head"])`` (every other ``torch.nn.Linear`` becomes a ``QLinear``; quanto has no
quantized RMSNorm or Embedding), then ``with Calibration(momentum=0.9): model(ids[i:i+1])`` over
every window of ``--calib`` (batch 1, in order), then ``freeze(model)``. In optimum-quanto 0.2.7:

* weights: int8 symmetric per output channel, scale = max|w_row| / 127 (``AbsmaxOptimizer``), round
  to nearest, no GPTQ/SmoothQuant;
* activations: int8 symmetric **per tensor, static**: each QLinear quantizes its input with one
  ``input_scale`` (a forward pre-hook), and its output with one ``output_scale`` (a forward hook)
  unless ``Calibration``'s "streamline" pass found that the output only feeds functions that
  cannot take a quantized tensor (``add``, ``silu``, ...), in which case that hook is removed.
  Calibration sets each scale to max|x| / 127 of the first batch, then to the moving average
  ``0.9 * scale + 0.1 * max|x| / 127`` of each later batch; codes are round-to-nearest, clamped to
  [-128, 127];
* the frozen int8 x int8 products run through ``torch._int_mm`` on CPU (torch >= 2.6), rescaled
  by ``input_scale * weight_scale`` in float32.

The model is evaluated as quanto leaves it, by lowbit's ``lowbit/evaluate/perplexity.py`` (loaded
by path) against a fresh float32 load of ``--model``. Self-checks (in ``notes``): every QLinear
receives an int8 ``ActivationQBytesTensor`` with its calibrated scale, the int8 matmul kernel is
what runs, and the logits equal those of an independent float re-implementation (dequantized
weights, per-tensor int8 qdq of each Linear input, and of each output whose hook is kept), while
differing from the same weights with float activations.

Usage (inside out/peers/quanto):
  python bench/peers/w8a8_quanto.py --model DIR --calib calib.safetensors \
      --windows windows.safetensors --out result.json [--bos-id N]
"""

from __future__ import annotations

import platform
import sys
import time
import warnings
from importlib.metadata import version

from peer_common import (  # this directory (sys.path[0])
    load_ids,
    parse_w8a8_args,
    score_against_float,
    write_row,
)

MOMENTUM = 0.9


def main(argv=None) -> None:
    args = parse_w8a8_args(__doc__.split("\n")[0], argv)
    import torch
    from optimum.quanto import Calibration, QLinear, freeze, qint8, quantize
    from optimum.quanto.nn.qmodule import QModuleMixin
    from optimum.quanto.tensor import ActivationQBytesTensor, WeightQBytesTensor
    from transformers import AutoModelForCausalLM

    notes: list[str] = []
    ids = load_ids(args.calib)
    windows = load_ids(args.windows)
    samples, seqlen = ids.shape

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        quantize(model, weights=qint8, activations=qint8, exclude=["lm_head"])
        with torch.no_grad(), Calibration(momentum=MOMENTUM):
            for i in range(samples):
                model(ids[i : i + 1], use_cache=False)
        freeze(model)
        quantize_seconds = time.perf_counter() - t0
    tool_warnings = list(dict.fromkeys(f"{w.category.__name__}: {w.message}" for w in caught))
    model.eval()
    notes.append(f"quantize(model, weights=qint8, activations=qint8, exclude=['lm_head']); "
                 f"Calibration(momentum={MOMENTUM}) (streamline=True, its default) over all {samples}x{seqlen} "
                 f"calibration windows, batch 1, in order, under torch.no_grad; then freeze(model)")

    # 1. What quanto made of the model.
    qlinears = {n: m for n, m in model.named_modules() if isinstance(m, QModuleMixin)}
    plain = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear]
    problems = []
    out_quantized = []
    for name, m in qlinears.items():
        if not isinstance(m, QLinear):
            problems.append(f"{name}: {type(m).__name__} (only QLinear expected)")
        if m.weight_qtype is not qint8 or m.activation_qtype is not qint8:
            problems.append(f"{name}: weight {m.weight_qtype}, activations {m.activation_qtype}")
        if not isinstance(m.weight, WeightQBytesTensor) or m.weight._data.dtype != torch.int8:
            problems.append(f"{name}: weight not frozen to int8 ({type(m.weight).__name__})")
        elif m.weight._scale.numel() != m.out_features:
            problems.append(f"{name}: {m.weight._scale.numel()} weight scales for {m.out_features} rows")
        if m.input_scale.numel() != 1 or float(m.input_scale) == 1.0:
            problems.append(f"{name}: input_scale {m.input_scale} (not calibrated?)")
        if "input" not in m._quantize_hooks or m._quantize_hooks["input"].id not in m._forward_pre_hooks:
            problems.append(f"{name}: no input quantization hook")
        if m._quantize_hooks.get("output") is not None and m._quantize_hooks["output"].id in m._forward_hooks:
            out_quantized.append(name)
    if not qlinears:
        sys.exit("quanto quantized no module")
    if problems:
        sys.exit("unexpected quantization state:\n" + "\n".join(problems[:20]))
    short = sorted({n.split(".")[-1] for n in out_quantized})
    notes.append(f"{len(qlinears)} QLinear (int8 weights frozen as WeightQBytesTensor, one scale per output "
                 f"row; one calibrated input_scale each, input quantization pre-hook attached); left float: "
                 f"{plain}; outputs also quantized (per tensor, output_scale) after streamline: "
                 f"{len(out_quantized)} of {len(qlinears)} ({', '.join(short) or 'none'})")
    scales = torch.stack([m.input_scale.float() for m in qlinears.values()])
    notes.append(f"input_scale range {scales.min().item():.3g} .. {scales.max().item():.3g} "
                 f"(= clip level / 127)")

    # 2. What reaches the matmuls, which kernel runs, and the logits vs an independent re-implementation.
    probe = windows[:1, : min(windows.shape[1], 128)]
    if args.bos_id is not None:
        probe = torch.cat([torch.full((1, 1), args.bos_id, dtype=probe.dtype), probe], dim=1)
    seen = {"qinput": 0, "own_scale": 0, "other": 0}

    def inspect_input(module, inputs):  # registered after quanto's pre-hook: sees what the matmul gets
        x = inputs[0]
        if isinstance(x, ActivationQBytesTensor) and x._data.dtype == torch.int8:
            seen["qinput"] += 1
            seen["own_scale"] += int(torch.equal(x._scale.reshape(()), module.input_scale.reshape(())))
        else:
            seen["other"] += 1

    int_mm = torch._int_mm
    int_mm_calls = [0]

    def counting_int_mm(a, b):
        int_mm_calls[0] += 1
        return int_mm(a, b)

    hooks = [m.register_forward_pre_hook(inspect_input) for m in qlinears.values()]
    torch._int_mm = counting_int_mm
    try:
        with torch.inference_mode():
            tool_logits = model(probe, use_cache=False).logits.float()
    finally:
        torch._int_mm = int_mm
        for h in hooks:
            h.remove()

    # Independent re-implementation on a fresh float model: each quantized Linear's output is
    # recomputed from the int8 codes of its input (per-tensor scale) and of its weight, as an exact
    # integer product (float64) rescaled in float32, as torch._int_mm + quanto's rescale do.
    manual = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    manual.eval()

    def codes(x, scale):
        return torch.clamp(torch.round(x / scale), -128, 127)

    def int8_linear(mod, inputs, output, s_in, w_codes, w_scale, s_out):
        x = inputs[0]
        q = codes(x, s_in).reshape(-1, x.shape[-1]).double()
        y = (q @ w_codes.T).float() * (s_in * w_scale).reshape(1, -1)
        y = y.reshape(*x.shape[:-1], -1)
        if mod.bias is not None:
            y = y + mod.bias
        return y if s_out is None else codes(y, s_out) * s_out

    with torch.no_grad():
        for name, m in qlinears.items():
            lin = manual.get_submodule(name)
            lin.weight.copy_(m.weight._data.float() * m.weight._scale.float())
    w8_logits = manual(probe, use_cache=False).logits.float()  # int8 weights, float activations
    hooks = []
    for name, m in qlinears.items():
        lin = manual.get_submodule(name)
        w_codes, w_scale = m.weight._data.double(), m.weight._scale.detach().float()
        s_in = m.input_scale.detach().float()
        s_out = m.output_scale.detach().float() if name in out_quantized else None
        hooks.append(lin.register_forward_hook(
            lambda mod, inp, out, a=s_in, b=w_codes, c=w_scale, d=s_out: int8_linear(mod, inp, out, a, b, c, d)))
    with torch.no_grad():
        manual_logits = manual(probe, use_cache=False).logits.float()
    for h in hooks:
        h.remove()
    del manual
    scale = tool_logits.abs().max().item()
    d_w8 = (tool_logits - w8_logits).abs().max().item()
    d_manual = (tool_logits - manual_logits).abs().max().item()
    n_calls = len(qlinears)
    notes.append(f"activation check on a {probe.shape[1]}-token probe: {seen['qinput']} of {n_calls} QLinear "
                 f"calls got an int8 ActivationQBytesTensor ({seen['own_scale']} with their own input_scale, "
                 f"{seen['other']} got a float input); torch._int_mm ran {int_mm_calls[0]} times; max |logits| "
                 f"= {scale:.3g}; max |logits(quanto) - logits(same int8 weights, float activations)| = "
                 f"{d_w8:.3g}; max |logits(quanto) - logits(own re-implementation: int8 codes of each input "
                 f"with its input_scale times the int8 weight codes, exact integer sums rescaled in float32, "
                 f"kept outputs re-quantized)| = {d_manual:.3g}")
    # Fail only when the activations are plainly not quantized; a re-implementation mismatch is
    # reported, not fatal.
    if not (seen["qinput"] == n_calls and seen["other"] == 0 and int_mm_calls[0] >= n_calls and d_w8 > 0):
        sys.exit("activation quantization is not what was expected:\n" + notes[-1])
    if d_manual > 1e-3 * max(1.0, scale):
        notes.append("WARNING: quanto's forward is not reproduced by the re-implementation")
    else:
        notes.append("=> static per-tensor int8 activation quantization is active in the evaluated forward, "
                     "with int8 x int8 -> int32 products (torch._int_mm)")

    # 3. Evaluate the model as quanto leaves it against the float model.
    result, _ = score_against_float(model, args.model, windows, args.bos_id)
    notes.append(f"evaluated with lowbit/evaluate/perplexity.py (by path) on {windows.shape[0]}x{windows.shape[1]} "
                 f"windows, bos_id={args.bos_id}, reference = fresh float32 load of --model; torch threads "
                 f"{torch.get_num_threads()}")
    if tool_warnings:
        notes.append("tool warnings: " + " | ".join(tool_warnings[:10]))

    versions = {p: version(p) for p in ("optimum-quanto", "torch", "transformers")}
    row = {
        "setting": "W8A8 static per-tensor",
        "method": "rtn (absmax)",
        "acts": f"int8 static per-tensor (absmax, moving average {MOMENTUM})",
        "tool": f"optimum-quanto {versions['optimum-quanto']}",
        "quantize_seconds": quantize_seconds,
        "bpw": None,
        **result,
        "notes": notes,
        "versions": versions,
        "python": platform.python_version(),
    }
    write_row(args.out, row)


if __name__ == "__main__":
    main()

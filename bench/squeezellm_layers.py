"""SqueezeLLM against GPTQ on single layers of SmolLM2-135M: each layer's output error
``tr(dW H dW^T)`` on its calibration inputs, printed (a quick screen, not a table of the README).

Hessians from 8 windows of 256 tokens of WikiText-2 valid (seed 0); the Fisher is approximated by
each column's Hessian diagonal (the whole-model Fisher needs a backward pass through every layer:
``bench/codebook_methods.py`` measures the real thing). Rows: GPTQ with mse ranges at int3/int4
g64 (asymmetric), squeezellm lut3/lut4 per row with 0.25% outliers, with and without the level refit.

Run: ``python bench/squeezellm_layers.py``.
"""

from __future__ import annotations

import time

import torch

from lowbit.api import load
from lowbit.methods import get_method
from lowbit.methods.squeezellm import SqueezeLLMConfig
from lowbit.pipeline.calibration import calibration_windows
from lowbit.scheme import QuantScheme

LAYERS = ["model.layers.5.self_attn.q_proj", "model.layers.5.mlp.down_proj", "model.layers.5.mlp.gate_proj"]


def main() -> None:
    torch.set_num_threads(1)
    model, tokenizer = load("smollm2-135m")
    inputs: dict[str, list[torch.Tensor]] = {n: [] for n in LAYERS}
    for name in LAYERS:
        model.get_submodule(name).register_forward_pre_hook(
            lambda module, args, name=name: inputs[name].append(args[0].reshape(-1, args[0].shape[-1]).float()))
    with torch.no_grad():
        for window in calibration_windows(tokenizer, samples=8, seqlen=256, seed=0):
            model(window[None], use_cache=False)
    gptq, squeeze = get_method("gptq"), get_method("squeezellm")
    for name in LAYERS:
        x = torch.cat(inputs[name])
        H = 2 * x.T @ x / x.shape[0]
        W = model.get_submodule(name).weight.detach().float().clone()
        stats = {"hessian": H, "fisher": H.diagonal()[None].expand_as(W).contiguous()}

        def error(qw) -> float:
            dW = qw.dequantize() - W
            return float(((dW @ H) * dW).sum())

        print(name)
        for bits in (3, 4):
            scheme = QuantScheme(bits=bits, group_size=64, symmetric=False, observer="mse")
            qw = gptq.solve([W], scheme, gptq.default_config(), stats, [name])[0]
            print(f"  gptq mse int{bits} g64: error {error(qw):.3f} at {qw.bits_per_weight:.3f} bpw")
            for refine in (True, False):
                start = time.perf_counter()
                qw = squeeze.solve([W], QuantScheme(format="lut", bits=bits, granularity="channel"),
                                   SqueezeLLMConfig(refine=refine), stats, [name])[0]
                print(f"  squeezellm lut{bits} refine={refine}: error {error(qw):.3f} at {qw.bits_per_weight:.3f} "
                      f"bpw ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()

"""Where static W8A8's error comes from: put some linears' inputs back on dynamic per-token scales.

SmoothQuant (``--alpha``) + RTN 8-bit weights, static per-tensor 8-bit inputs (``--format``) calibrated with
``--observer`` on the first 32 of the benchmark's 128 x 512 calibration windows; KL to the float
model on the first ``--windows`` WikiText-2 test windows. ``--by kind`` makes one row per kind of
linear (q/k/v, o, gate/up, down) whose inputs go dynamic, ``--by layer`` one row per block whose
``down_proj`` input goes dynamic, and ``--by output-error`` compares minmax thresholds with
``down_proj`` thresholds that minimise each layer's own output error ``||(Q_t(X) - X) W^T||^2`` on
2048 sampled calibration tokens.

    python bench/w8a8_ablation.py --alpha 0.8 --observer minmax --by kind

Prints one line per row; these are diagnostics behind the W8A8 notes in the README, not a table.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

KINDS = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gateup": ("gate_proj", "up_proj"),
         "down": ("down_proj",)}
FRACTIONS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.25, 0.2, 0.15, 0.1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--alpha", type=float, default=0.8)
    ap.add_argument("--observer", default="minmax")
    ap.add_argument("--format", choices=["int8", "fp8_e4m3"], default="int8")
    ap.add_argument("--by", choices=["kind", "layer", "output-error"], default="kind")
    ap.add_argument("--windows", type=int, default=8)
    args = ap.parse_args()
    from bench_setup import bench_setup
    from safetensors.torch import load_file

    from lowbit.act_scheme import ActScheme
    from lowbit.api import quantize
    from lowbit.evaluate.perplexity import evaluate_models
    from lowbit.methods.smoothquant import SmoothQuantConfig
    from lowbit.nn import quantized_layers
    from lowbit.pipeline.activations import record_activation_histograms
    from lowbit.pipeline.recipe import Recipe, TransformStep

    setup = bench_setup("bench/w8a8_ablation.py", args.model, 128, args.windows)
    calib = load_file(setup.calib_path)["input_ids"][:32]
    dynamic = ActScheme(format=args.format)
    static = ActScheme(format=args.format, dynamic=False, granularity="tensor", observer=args.observer)
    base = copy.deepcopy(setup.reference)
    smoothing = TransformStep("smoothquant", SmoothQuantConfig(alpha=args.alpha))
    quantize(base, Recipe(transforms=(smoothing,), default=dynamic.weight_scheme()), calibration=calib,
             progress=False)
    hist = record_activation_histograms(base, calib, progress=False)
    thresholds = {name: hist[name].threshold(static.observer, fake_quant=static.fake_quant, levels=256,
                                             percentile=static.percentile) for name in quantized_layers(base)}
    if args.by == "output-error":
        variants = {"minmax": ([], {}), "down output-error": ([], down_output_error(base, calib, static, thresholds))}
    elif args.by == "layer":
        n = len([n for n in thresholds if n.endswith("down_proj")])
        variants = {f"L{i} down dynamic": ([f"layers.{i}.mlp.down_proj"], {}) for i in range(n)}
    else:
        variants = {"all static": ([], {}), "all dynamic": ([s for k in KINDS.values() for s in k], {})}
        variants |= {f"{k} dynamic": (list(v), {}) for k, v in KINDS.items()}
    models = [with_acts(base, dynamic, static, thresholds | override, suffixes)
              for suffixes, override in variants.values()]
    results = evaluate_models(models, setup.windows, bos_id=setup.bos_id, reference=setup.reference, progress=False)
    for label, result in zip(variants, results, strict=True):
        r = result.to_dict()
        print(f"{args.format} alpha {args.alpha} {args.observer} | {label}: ppl {r['ppl']:.3f} KL {r['kld']:.4f}", flush=True)


def with_acts(base, dynamic, static, thresholds: dict[str, float], dynamic_suffixes: list[str]):
    """A copy of ``base`` whose linears run W8A8: dynamic where the name ends with one of the suffixes."""
    from lowbit.nn import quantized_layers, set_submodule
    from lowbit.nn.act_linear import ActQuantLinear

    model = copy.deepcopy(base)
    for name, module in quantized_layers(model).items():
        if any(name.endswith(s) for s in dynamic_suffixes):
            set_submodule(model, name, ActQuantLinear.from_quant_linear(module, dynamic, None, layer=name))
        else:
            scale = static.scale_for(thresholds[name])
            set_submodule(model, name, ActQuantLinear.from_quant_linear(module, static, scale, layer=name))
    return model


@torch.no_grad()
def down_output_error(base, calib, static, thresholds: dict[str, float]) -> dict[str, float]:
    """Per ``down_proj``, the fraction of its threshold with the least output error on sampled tokens."""
    from lowbit.act_scheme import quantize_activation
    from lowbit.nn import quantized_layers

    layers = {n: m for n, m in quantized_layers(base).items() if n.endswith("down_proj")}
    samples: dict[str, list[torch.Tensor]] = {}
    generator = torch.Generator().manual_seed(0)

    def grab(name):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1])
            samples.setdefault(name, []).append(x[torch.randperm(len(x), generator=generator)[:256]].clone())
        return hook

    handles = [m.register_forward_pre_hook(grab(n)) for n, m in layers.items()]
    for window in calib[:8]:
        base(window.reshape(1, -1))
    for h in handles:
        h.remove()
    chosen = {}
    for name, xs in samples.items():
        X = torch.cat(xs)
        W = layers[name].quantized_weight().dequantize().float()
        errors = []
        for fraction in FRACTIONS:
            q, s = quantize_activation(X, static, torch.tensor(static.scale_for(thresholds[name] * fraction)))
            errors.append(float((((q.float() * s) - X) @ W.T).square().sum()))
        chosen[name] = thresholds[name] * FRACTIONS[min(range(len(errors)), key=errors.__getitem__)]
    return chosen


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()

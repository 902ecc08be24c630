"""lowbit's W8A8 activation quantization against compressed-tensors' own, layer by layer, bit for bit.

For a W8A8 checkpoint made by ``bench/export_clients.py`` (``out/bench/<model>/export_clients/<checkpoint>``
and its ``.to-compressed-tensors`` export), ``bench/peers/probe_ct_activations.py`` runs the first
``--tokens`` tokens of the first evaluation window through the export in the compressed-tensors client and
saves, per layer, the input it received and the package's fake quantization of it (``forward_quantize``).
This script then quantizes *the same inputs* with lowbit's ``quantize_activation`` (the scheme and
``input_scale`` of lowbit's checkpoint) and compares ``codes * scale`` with the client's values: elements
that differ, the largest difference, and (static) the ``input_scale`` each side uses. For int8 dynamic
schemes it also quantizes the inputs with lowbit's scheme but the package's divisor (``max|x| / 127.5``)
and counts what still differs. It runs lowbit's checkpoint on the same tokens too and reports how far
its layer inputs are from the client's (the first layer's must agree exactly; later ones carry the
earlier layers' differences). Layers quantized on one side only are listed.

With ``--arithmetic`` it scores lowbit's checkpoint on all the windows with lowbit's codes and scales but
the product done in float32 (dequantized input times dequantized weight: the client's), in float64, and
(int8 dynamic) in float32 with the package's divisor (the client's forward exactly), beside lowbit's own
eval (int8: the exact int32 product, as vLLM's int8 GEMM; FP8 on a CPU: float32 products of the codes)
and the client's row from ``export_clients.py``: what the scheme decides apart from what rounding does.

Results: ``bench/results/ct_activation_probe_<model>_<checkpoint>.json`` and ``.md``.

Run (after ``bench/export_clients.py`` made the checkpoint and its export):
``python bench/ct_activation_probe.py --model gemma3-270m --checkpoint w8a8-int8-dynamic [--arithmetic]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench_results import write_results  # this directory (sys.path[0])

ROOT = Path(__file__).resolve().parent.parent


def lowbit_inputs(checkpoint: Path, ids: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict]:
    """Each ``ActQuantLinear``'s float32 input when lowbit's checkpoint runs ``ids [1, T]``, and the layers."""
    from lowbit.api import load
    from lowbit.nn import prepare_kernels, quantized_layers
    from lowbit.nn.act_linear import ActQuantLinear

    model, _ = load(checkpoint)
    prepare_kernels(model, activations="float32")
    layers = {n: m for n, m in quantized_layers(model).items() if isinstance(m, ActQuantLinear)}
    seen: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        layer.register_forward_pre_hook(lambda m, i, name=name: seen.__setitem__(
            name, i[0].detach().reshape(-1, i[0].shape[-1]).float().clone()))
    with torch.no_grad():
        model(ids)
    return seen, layers


def package_fake_quant(x: torch.Tensor, act) -> torch.Tensor:
    """``x`` quantize-dequantized as compressed-tensors 0.19's dynamic symmetric int8 ``forward_quantize``
    does it (``calculate_qparams``: scale = max|x| / (255 / 2), zero scales replaced by float32 eps; then
    clamp to [-128, 127] before rounding): lowbit's per-token scheme with the package's divisor."""
    amax = x.abs().amax(dim=1, keepdim=True) if act.granularity == "token" else x.abs().amax().reshape(1, 1)
    scale = amax / 127.5
    scale = torch.where(scale == 0, torch.tensor(torch.finfo(torch.float32).eps), scale)
    return torch.round(torch.clamp(x / scale, -128, 127)) * scale


def client_arithmetic(kind: str):
    """A replacement for ``ActQuantLinear.forward`` that keeps lowbit's codes and scales but multiplies as
    ``kind`` says: ``float32`` (dequantized input times dequantized weight in float32, what the package's
    forward does after its fake quantization), ``float32-127.5`` (that, with the package's dynamic
    divisor: the client's forward exactly), ``float64`` (the same product in float64)."""
    import torch.nn.functional as F

    from lowbit.act_scheme import quantize_activation

    weights: dict[int, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, x2 = x.shape[:-1], x.reshape(-1, self.in_features).float()
        if kind == "float32-127.5" and self.act.dynamic:  # int8 only (main adds this kind for int8)
            fake = package_fake_quant(x2, self.act)
        else:
            codes, scale = quantize_activation(x2, self.act, None if self.act.dynamic else self.input_scale)
            fake = codes.float() * scale
        if id(self) not in weights:
            weights[id(self)] = self.quantized_weight().dequantize().float()
        w = weights[id(self)]
        y = F.linear(fake.double(), w.double()).float() if kind == "float64" else F.linear(fake, w)
        if self.bias is not None:
            y = y + self.bias.float()
        return y.reshape(*lead, self.out_features).to(x.dtype)

    return forward


def arithmetic_ppl(checkpoint: Path, windows: torch.Tensor, bos_id: int | None, kind: str) -> float:
    """Perplexity of lowbit's checkpoint on ``windows`` with its 8-bit product done as ``kind``."""
    from lowbit.api import load
    from lowbit.evaluate.perplexity import evaluate_windows
    from lowbit.nn import prepare_kernels
    from lowbit.nn.act_linear import ActQuantLinear

    model, _ = load(checkpoint)
    prepare_kernels(model, activations="float32")
    original = ActQuantLinear.forward
    ActQuantLinear.forward = client_arithmetic(kind)
    try:
        return evaluate_windows(model, windows, bos_id=bos_id, progress=False).ppl
    finally:
        ActQuantLinear.forward = original


def compare(name: str, client: dict[str, torch.Tensor], layer, ours_input: torch.Tensor | None) -> dict:
    """One layer: lowbit's quantization of the client's input against the client's fake quantization."""
    from lowbit.act_scheme import quantize_activation

    x, fake = client[f"{name}.input"], client[f"{name}.fake"]
    codes, scale = quantize_activation(x, layer.act, None if layer.act.dynamic else layer.input_scale)
    ours = codes.float() * scale
    differ = ours != fake
    row = {"elements": fake.numel(), "differ": int(differ.sum()),
           "max_abs_diff": float((ours - fake).abs().max()),
           "tokens_differ": int(differ.any(dim=1).sum()), "tokens": fake.shape[0]}
    if layer.act.dynamic:
        if layer.act.format.value == "int8":
            row["differ_with_divisor_127_5"] = int((package_fake_quant(x, layer.act) != fake).sum())
    else:
        row["input_scale_lowbit"] = float(layer.input_scale)
        row["input_scale_client"] = float(client[f"{name}.input_scale"][0])
    if ours_input is not None:
        row["input_max_rel_diff_vs_lowbit_run"] = float((ours_input - x).abs().max() / x.abs().max())
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--checkpoint", default="w8a8-int8-dynamic", help="checkpoint name under export_clients/")
    ap.add_argument("--windows", type=int, default=8, help="the eval-<N>x512 token file export_clients wrote")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--arithmetic", action="store_true",
                    help="also score the checkpoint on all the windows with the client's arithmetic (slow)")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from safetensors import safe_open
    from safetensors.torch import load_file

    from lowbit.api import load
    from lowbit.sources import needs_bos

    name = Path(args.model).name
    work = ROOT / "out" / "bench" / name / "export_clients"
    checkpoint, exported = work / args.checkpoint, work / f"{args.checkpoint}.to-compressed-tensors"
    ids_path = work / f"eval-{args.windows}x512.safetensors"
    for p in (checkpoint, exported, ids_path):
        if not p.exists():
            sys.exit(f"{p} is missing; run python bench/export_clients.py --model {args.model} --windows "
                     f"{args.windows} first")
    _, tokenizer = load(args.model)
    bos_id = tokenizer.bos_token_id if needs_bos(tokenizer) else None
    probe = work / f"{args.checkpoint}.probe.safetensors"
    cmd = [str(ROOT / "out" / "peers" / "llmcompressor" / "bin" / "python"),
           str(ROOT / "bench" / "peers" / "probe_ct_activations.py"), "--model", str(exported),
           "--windows", str(ids_path), "--tokens", str(args.tokens), "--out", str(probe)]
    if bos_id is not None:
        cmd += ["--bos-id", str(bos_id)]
    print("$", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)
    client = load_file(str(probe))
    with safe_open(str(probe), "pt") as f:
        schemes = json.loads(f.metadata()["schemes"])

    ids = load_file(str(ids_path))["input_ids"][0, : args.tokens]
    if bos_id is not None:
        ids = torch.cat([torch.tensor([bos_id]), ids[:-1]])
    ours_inputs, layers = lowbit_inputs(checkpoint, ids.unsqueeze(0))
    rows = {n: compare(n, client, layers[n], ours_inputs.get(n)) for n in layers if n in schemes}
    only_lowbit, only_client = sorted(set(layers) - set(schemes)), sorted(set(schemes) - set(layers))
    first = next(iter(rows))
    summary = {"layers": len(rows), "layers_differ": sum(r["differ"] > 0 for r in rows.values()),
               "elements": sum(r["elements"] for r in rows.values()),
               "elements_differ": sum(r["differ"] for r in rows.values()),
               "max_abs_diff": max(r["max_abs_diff"] for r in rows.values()),
               "first_layer": first,
               "first_layer_input_max_rel_diff": rows[first].get("input_max_rel_diff_vs_lowbit_run"),
               "activation_quantized_only_by_lowbit": only_lowbit, "activation_quantized_only_by_client": only_client,
               "client_scheme": schemes[first], "lowbit_scheme": layers[first].act.describe()}
    if args.arithmetic:  # lowbit's eval and the client's row are the ones export_clients.py measured
        lowbit_ppl = json.loads((work / f"{args.checkpoint}.eval-{args.windows}.json").read_text())["ppl"]
        client_ppl = json.loads((work / f"{args.checkpoint}.compressed_tensors.default.json").read_text())["ppl"]
        windows = load_file(str(ids_path))["input_ids"]
        int8_dynamic = layers[first].act.dynamic and layers[first].act.format.value == "int8"
        kinds = ["float32", "float64"] + (["float32-127.5"] if int8_dynamic else [])
        summary["arithmetic_ppl"] = {"lowbit": lowbit_ppl, "client": client_ppl,
                                     **{k: arithmetic_ppl(checkpoint, windows, bos_id, k) for k in kinds}}
    meta = {"command": " ".join(["python", "bench/ct_activation_probe.py", *sys.argv[1:]]), "model": name,
            "checkpoint": args.checkpoint, "tokens": args.tokens, "bos": bos_id is not None,
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    lines = [f"{name} {args.checkpoint}: {summary['layers_differ']} of {summary['layers']} layers differ, "
             f"{summary['elements_differ']} of {summary['elements']} elements, "
             f"max |diff| {summary['max_abs_diff']:.3g}; "
             f"only lowbit quantizes {only_lowbit or 'none'}, only the client {only_client or 'none'}", "",
             "| layer | elements differ | tokens differ | max abs diff | static input_scale (client / lowbit) | "
             "elements differ, lowbit's scheme with max/127.5 | input vs lowbit's run |",
             "|---|---|---|---|---|---|---|"]
    if "arithmetic_ppl" in summary:
        ppl = summary["arithmetic_ppl"]
        lines[1:1] = ["", f"perplexity on {args.windows} windows, lowbit's codes and scales, product done as:", "",
                      "| product | ppl | vs lowbit |", "|---|---|---|",
                      *[f"| {k} | {v:.4f} | {100 * (v / ppl['lowbit'] - 1):+.4f}% |" for k, v in ppl.items()]]
    for n, r in rows.items():
        scale = f"{r['input_scale_client']:.9g} / {r['input_scale_lowbit']:.9g}" if "input_scale_client" in r else "-"
        lines.append(f"| {n} | {r['differ']} / {r['elements']} | {r['tokens_differ']} / {r['tokens']} | "
                     f"{r['max_abs_diff']:.3g} | {scale} | {r.get('differ_with_divisor_127_5', '-')} | "
                     f"{r.get('input_max_rel_diff_vs_lowbit_run', float('nan')):.3g} |")
    out = ROOT / "bench" / "results" / f"ct_activation_probe_{name}_{args.checkpoint}.json"
    write_results(out, {"meta": meta, "summary": summary, "rows": rows}, lines)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()

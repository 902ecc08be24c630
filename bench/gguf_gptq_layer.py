"""GPTQ onto GGUF blocks vs llama.cpp's rounding, on two real linears of SmolLM2-135M.

For layer 5's ``mlp.down_proj`` (1536 input columns: legacy types and k-quants) and
``self_attn.q_proj`` (576: legacy types only, 576 is not a multiple of 256), collect
``H = 2 X^T X / n`` from calibration windows run through the float model (a pre-hook on each
layer's input; the forward stops after layer 5), then report the relative output error
``||X^T (W - Q)||^2 / ||X^T W||^2 = tr(D H D^T) / tr(W H W^T)`` of three quantizers of ``W``:
``quantize_rows`` without importance (``llama-quantize`` with no imatrix), with
``importance = diag(H)`` (an imatrix from the same inputs), and ``gptq_quantize_rows``.

Caveat: SmolLM2's demo weights come from a Q4_1 GGUF, so every linear already lies on a Q4_1 grid
(groups of 32 along the input): Q4_1 rounding recovers them exactly, and types close to that grid
(Q4_K, Q5_K) are flattered too. ``--jitter F`` adds seeded Gaussian noise of ``F`` times each row's
RMS to the weights first, which moves them off that grid (F = 0.1 is about the size of a Q4_1 step).

Run: ``OMP_NUM_THREADS=1 python bench/gguf_gptq_layer.py [--windows 32] [--layer 5] [--jitter 0.1] [--types ...]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

sys.path.insert(0, str(Path(__file__).parent))
from bench_results import write_results

from lowbit.api import load
from lowbit.gguf.blocks import dequantize_rows, fits, quantize_rows
from lowbit.gguf.gptq_blocks import gptq_quantize_rows
from lowbit.methods.gptq import accumulate_hessian
from lowbit.pipeline.calibration import calibration_windows, default_calibration_path

TYPES = (T.Q4_0, T.Q4_1, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K)
NEW_TYPES = (T.IQ4_NL, T.IQ4_XS, T.MXFP4, T.IQ3_XXS, T.IQ2_XS, T.TQ2_0)  # issue 18: table, lattice, ternary
LINEARS = ("mlp.down_proj", "self_attn.q_proj")


class _Stop(Exception):
    """Raised after the measured layer: the layers above it (and the LM head) are not needed."""


def collect_hessians(model: torch.nn.Module, windows: torch.Tensor, layer: int, batch: int) -> dict[str, torch.Tensor]:
    """``H = 2 X^T X / n`` of the inputs of each of ``LINEARS`` in decoder layer ``layer``."""
    block = model.model.layers[layer]
    stats: dict[str, tuple[torch.Tensor | None, int]] = {name: (None, 0) for name in LINEARS}

    def pre_hook(name: str):
        def hook(_module: torch.nn.Module, args: tuple) -> None:
            stats[name] = accumulate_hessian(*stats[name][:1], args[0], stats[name][1])
        return hook

    def stop(*_):
        raise _Stop

    handles = [block.get_submodule(name).register_forward_pre_hook(pre_hook(name)) for name in LINEARS]
    handles.append(block.register_forward_hook(stop))
    try:
        with torch.no_grad():
            for i in range(0, len(windows), batch):
                try:
                    model(windows[i:i + batch], use_cache=False)
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()
    return {name: H for name, (H, _) in stats.items()}


def relative_error(W: torch.Tensor, Q: np.ndarray, H: torch.Tensor) -> float:
    """``tr(D H D^T) / tr(W H W^T)`` in float64, ``D = W - Q``."""
    Hd, Wd = H.double(), W.double()
    D = Wd - torch.from_numpy(Q).double()
    return float(torch.einsum("ij,jk,ik->", D, Hd, D) / torch.einsum("ij,jk,ik->", Wd, Hd, Wd))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layer", type=int, default=5)
    parser.add_argument("--windows", type=int, default=32, help="calibration windows of 512 tokens")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--jitter", type=float, default=0.0, help="noise added to W, in units of its row RMS")
    parser.add_argument("--results", default=None,
                        help="also write the rows to bench/results/NAME.{json,md}")
    parser.add_argument("--types", nargs="+", default=[t.name for t in TYPES],
                        help=f"GGUF types (default the legacy and k-quants; also {' '.join(t.name for t in NEW_TYPES)})")
    args = parser.parse_args()
    types = [T[name.upper()] for name in args.types]
    torch.set_num_threads(1)

    model, tokenizer = load(args.model)
    model.eval()
    windows = calibration_windows(tokenizer, samples=args.windows, seqlen=512, seed=0)
    t0 = time.perf_counter()
    hessians = collect_hessians(model, windows, args.layer, args.batch)
    print(f"# {args.model} layer {args.layer}: H from {args.windows} x 512 tokens of {default_calibration_path()} "
          f"(cleaned, seed 0) in {time.perf_counter() - t0:.1f} s; torch threads {torch.get_num_threads()}")
    if args.jitter:
        print(f"# weights jittered by {args.jitter} x row RMS (seed 0) to leave the Q4_1 source grid")
    header = [f"# {args.model} layer {args.layer}: relative output error ||X^T (W - Q)||^2 / ||X^T W||^2 "
              f"(lower is better), H from {args.windows} x 512 calibration tokens, jitter {args.jitter}", "",
              f"`python bench/gguf_gptq_layer.py {' '.join(sys.argv[1:])}` ({time.strftime('%Y-%m-%d')})", "",
              "| linear | type | no imatrix | imatrix = diag(H) | GPTQ | GPTQ / imatrix | GPTQ s |",
              "|---|---|---|---|---|---|---|"]
    rows: list[dict] = []
    print("# relative output error ||X^T (W - Q)||^2 / ||X^T W||^2 (lower is better)")
    print(f"{'linear':<18} {'type':<7} {'no imatrix':>11} {'imatrix':>11} {'GPTQ':>11} {'GPTQ/imat':>9} {'GPTQ s':>7}")
    for name in LINEARS:
        W = model.model.layers[args.layer].get_submodule(name).weight.detach().float()
        if args.jitter:
            noise = torch.randn(W.shape, generator=torch.Generator().manual_seed(0))
            W = W + args.jitter * W.pow(2).mean(dim=1, keepdim=True).sqrt() * noise
        H = hessians[name]
        for qtype in types:
            if not fits(qtype, W.shape[1]):
                continue
            plain = quantize_rows(W.numpy(), qtype)
            imatrix = quantize_rows(W.numpy(), qtype, H.diagonal().numpy())
            t0 = time.perf_counter()
            gptq = gptq_quantize_rows(W, H, qtype)
            seconds = time.perf_counter() - t0
            errs = [relative_error(W, dequantize_rows(d, qtype, W.shape[1]), H) for d in (plain, imatrix, gptq)]
            ratio = errs[2] / errs[1] if errs[1] > 0 else float("nan")
            print(f"{name:<18} {qtype.name:<7} {errs[0]:>11.3e} {errs[1]:>11.3e} {errs[2]:>11.3e} {ratio:>9.3f} "
                  f"{seconds:>7.2f}")
            rows.append({"linear": name, "type": qtype.name, "no_imatrix": errs[0], "imatrix": errs[1], "gptq": errs[2],
                         "gptq_over_imatrix": ratio, "gptq_seconds": seconds})
    if args.results:
        table = header + [f"| {r['linear']} | {r['type']} | {r['no_imatrix']:.3e} | {r['imatrix']:.3e} | {r['gptq']:.3e} | "
                          f"{r['gptq_over_imatrix']:.3f} | {r['gptq_seconds']:.1f} |" for r in rows]
        meta = {"command": f"python bench/gguf_gptq_layer.py {' '.join(sys.argv[1:])}", "date": time.strftime("%Y-%m-%d"),
                "model": args.model, "layer": args.layer, "windows": args.windows, "jitter": args.jitter}
        write_results(Path(__file__).parent / "results" / f"{args.results}.json", {"meta": meta, "rows": rows}, table)


if __name__ == "__main__":
    main()

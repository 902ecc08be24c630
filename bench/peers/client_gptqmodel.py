"""Load a GPTQ or AWQ directory with GPTQModel on CPU in float32 and score it, as a client of lowbit's export.

Runs inside out/peers/gptqmodel (bench/peers/setup.sh); never imports lowbit (the perplexity is lowbit's
scoring code loaded by path, ``peer_common.load_perplexity_module``, so both sides count the same tokens).

GPTQModel's CPU kernels for these formats (``TorchLinear`` for GPTQ, ``AwqTorchLinear`` for AWQ) dequantize
the packed codes in the dtype of the loaded scales and multiply with ``torch.matmul``; their class lists
only float16/bfloat16 as load dtypes, a check made at load time. ``--kernel torch`` adds float32 to that list
before loading, so the whole model (embeddings, norms, scales) stays float32 and the kernel's own unpacking
and dequantization run in float32; ``--kernel fused`` takes GPTQModel's own float32-capable CPU kernel
(``TorchFusedLinear``, int4 GPTQ only), which casts activations to bfloat16 inside.

With ``--reference-weights`` (float32 ``[out, in]`` weights by layer name, lowbit's dequantization), every
named layer's weight as its kernel computes it (its forward on the identity matrix) is compared with it
(max |difference|).

Usage (inside out/peers/gptqmodel):
  python bench/peers/client_gptqmodel.py --model DIR --windows ids.safetensors --out row.json [--bos-id N]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from peer_common import load_ids, load_perplexity_module, peak_rss_bytes  # this directory (sys.path[0])


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="GPTQ or AWQ directory")
    ap.add_argument("--windows", required=True, help="safetensors file with int64 input_ids [windows, seqlen]")
    ap.add_argument("--bos-id", type=int, default=None)
    ap.add_argument("--kernel", choices=["torch", "fused"], default="torch")
    ap.add_argument("--reference-weights", help="safetensors of float32 weights by layer name to compare with")
    ap.add_argument("--out", required=True, help="JSON row to write")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch
    from gptqmodel import BACKEND, GPTQModel
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear
    from gptqmodel.nn_modules.qlinear.torch_awq import AwqTorchLinear

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    quant_method = json.loads((Path(args.model) / "config.json").read_text())["quantization_config"]["quant_method"]
    if args.kernel == "torch":
        for kernel in (TorchLinear, AwqTorchLinear):
            kernel.SUPPORTS_DTYPES = [*kernel.SUPPORTS_DTYPES, torch.float32]
        backend = BACKEND.AWQ_TORCH if quant_method == "awq" else BACKEND.GPTQ_TORCH
    else:
        backend = BACKEND.GPTQ_TORCH_FUSED
    t0 = time.perf_counter()
    qmodel = GPTQModel.load(args.model, device="cpu", backend=backend, dtype=torch.float32)
    load_seconds = time.perf_counter() - t0
    model = qmodel.model.eval()
    kernels = sorted({type(m).__name__ for m in model.modules() if hasattr(m, "qweight")})
    weight_diff = None
    if args.reference_weights:
        from safetensors.torch import load_file

        weight_diff = 0.0
        for name, W in load_file(args.reference_weights).items():
            layer = model.get_submodule(name)
            with torch.no_grad():  # the kernel's own product with the identity: its weight, transposed
                ours = layer(torch.eye(W.shape[1], dtype=torch.float32)).T
                ours = ours - (0 if layer.bias is None else layer.bias.float()[:, None])
            weight_diff = max(weight_diff, (ours - W).abs().max().item())
    windows = load_ids(args.windows)
    result = load_perplexity_module().evaluate_windows(model, windows, bos_id=args.bos_id, progress=False).to_dict()
    row = {"client": f"GPTQModel {__import__('gptqmodel').__version__}", "backend": str(backend), "kernels": kernels,
           "dtype": str(next(model.parameters()).dtype), "load_seconds": load_seconds,
           "max_weight_diff": weight_diff, "peak_rss_bytes": peak_rss_bytes(), **result}
    Path(args.out).write_text(json.dumps(row, indent=2, default=str) + "\n")
    print(json.dumps({k: row[k] for k in ("client", "kernels", "ppl", "max_weight_diff")}))


if __name__ == "__main__":
    main()

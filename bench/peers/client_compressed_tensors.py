"""Load a compressed-tensors directory with transformers + the ``compressed-tensors`` package on CPU in float32
and score it, as a client of lowbit's export.

Runs inside out/peers/llmcompressor (bench/peers/setup.sh); never imports lowbit (the perplexity is lowbit's
scoring code loaded by path). transformers' compressed-tensors integration reads the config; with
``run_compressed=False`` the package's compressors (``pack-quantized``, ``int-quantized``,
``float-quantized``) decompress every layer into a float weight, and layers with input activation schemes
keep the package's fake quantization of their inputs in the forward (its own W8A8 simulation).

With ``--reference-weights`` (float32 ``[out, in]`` weights by layer name, lowbit's dequantization) the
decompressed weights of those layers are compared with them (max |difference|).

Usage (inside out/peers/llmcompressor):
  python bench/peers/client_compressed_tensors.py --model DIR --windows ids.safetensors --out row.json
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
    ap.add_argument("--model", required=True, help="compressed-tensors directory")
    ap.add_argument("--windows", required=True, help="safetensors file with int64 input_ids [windows, seqlen]")
    ap.add_argument("--bos-id", type=int, default=None)
    ap.add_argument("--reference-weights", help="safetensors of float32 weights by layer name to compare with")
    ap.add_argument("--out", required=True, help="JSON row to write")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    import compressed_tensors
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32,
                                                 quantization_config=CompressedTensorsConfig(run_compressed=False))
    load_seconds = time.perf_counter() - t0
    model.eval()
    weight_diff = None
    if args.reference_weights:
        from safetensors.torch import load_file

        weight_diff = 0.0
        for name, W in load_file(args.reference_weights).items():
            ours = model.get_submodule(name).weight.detach().float()
            weight_diff = max(weight_diff, (ours - W).abs().max().item())
    windows = load_ids(args.windows)
    result = load_perplexity_module().evaluate_windows(model, windows, bos_id=args.bos_id, progress=False).to_dict()
    schemes = sorted({type(m).__name__ for m in model.modules() if hasattr(m, "quantization_scheme")})
    row = {"client": f"transformers + compressed-tensors {compressed_tensors.__version__}",
           "kernels": schemes or ["dense (decompressed)"], "dtype": str(next(model.parameters()).dtype),
           "load_seconds": load_seconds, "max_weight_diff": weight_diff, "peak_rss_bytes": peak_rss_bytes(), **result}
    Path(args.out).write_text(json.dumps(row, indent=2, default=str) + "\n")
    print(json.dumps({k: row[k] for k in ("client", "kernels", "ppl", "max_weight_diff")}))


if __name__ == "__main__":
    main()

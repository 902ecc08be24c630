"""What compressed-tensors does to the inputs of a W8A8 directory's linears: each layer's raw input on one
window and the package's own fake quantization of it (``forward_quantize``), for ``bench/ct_activation_probe.py``
to compare with lowbit's activation quantization bit for bit.

Runs inside out/peers/llmcompressor (bench/peers/setup.sh); never imports lowbit. Loads the directory as
``client_compressed_tensors.py`` does (transformers, ``run_compressed=False``), runs the first ``--tokens``
tokens of the first window, and saves per layer with input activation quantization: ``NAME.input`` (the
float32 input the layer received), ``NAME.fake`` (``forward_quantize`` of it with the layer's scheme, as the
layer's forward uses it) and, for static schemes, ``NAME.input_scale`` (the scale the package loaded).

Usage (inside out/peers/llmcompressor):
  python bench/peers/probe_ct_activations.py --model DIR --windows ids.safetensors --out probe.safetensors
"""

from __future__ import annotations

import argparse
import json
import os

from peer_common import load_ids  # this directory (sys.path[0])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="compressed-tensors directory with input activation schemes")
    ap.add_argument("--windows", required=True, help="safetensors file with int64 input_ids [windows, seqlen]")
    ap.add_argument("--bos-id", type=int, default=None)
    ap.add_argument("--tokens", type=int, default=128, help="tokens of the first window to run")
    ap.add_argument("--out", required=True, help="safetensors file to write")
    args = ap.parse_args(argv)
    import torch
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32,
                                                 quantization_config=CompressedTensorsConfig(run_compressed=False))
    model.eval()
    saved: dict[str, torch.Tensor] = {}
    schemes: dict[str, dict] = {}

    def capture(name):
        def hook(module, inputs):
            x = inputs[0].detach()
            scheme = module.quantization_scheme.input_activations
            saved[f"{name}.input"] = x.reshape(-1, x.shape[-1]).float().clone()
            fake = forward_quantize(module, x.clone(), "input", scheme)
            saved[f"{name}.fake"] = fake.reshape(-1, x.shape[-1]).float()
            if not scheme.dynamic:
                saved[f"{name}.input_scale"] = module.input_scale.detach().float().reshape(-1).clone()
            schemes[name] = scheme.model_dump(mode="json")
        return hook

    for name, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is not None and scheme.input_activations is not None:
            module.register_forward_pre_hook(capture(name))
    ids = load_ids(args.windows)[0, : args.tokens]
    if args.bos_id is not None:
        ids = torch.cat([torch.tensor([args.bos_id]), ids[:-1]])  # as lowbit's eval: [bos] + window
    with torch.no_grad():
        model(ids.unsqueeze(0))
    save_file({k: v.contiguous() for k, v in saved.items()}, args.out, metadata={"schemes": json.dumps(schemes)})
    print(json.dumps({"layers": len(schemes), "out": args.out}))


if __name__ == "__main__":
    main()

"""bitsandbytes on CPU through transformers' ``BitsAndBytesConfig``: memory and quality of one mode,
measured as ``bench/load_4bit.py`` measures lowbit's rows. Runs in out/peers/bnb (no lowbit import).

    out/peers/bnb/bin/python bench/peers/bnb_4bit.py --model DIR --windows ids.safetensors \
        --mode "nf4 + dq" --out row.json
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from peer_common import load_ids, proc_status, score_against_float

MODES = ("nf4 + dq", "nf4", "fp4 + dq", "int8")


def config(mode: str):
    import torch
    from transformers import BitsAndBytesConfig

    if mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)  # llm_int8_threshold 6.0
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=mode.split()[0],
                              bnb_4bit_use_double_quant=mode.endswith("dq"), bnb_4bit_compute_dtype=torch.float32)


def linear_bytes(model) -> tuple:
    """Bytes of the quantized linears' weight and quantization state; their parameter count."""
    import bitsandbytes as bnb

    held = params = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            state = m.weight.quant_state
            held += m.weight.nbytes + state.absmax.nbytes + state.code.nbytes
            if state.nested:
                held += state.state2.absmax.nbytes + state.state2.code.nbytes
            params += m.in_features * m.out_features
        elif isinstance(m, bnb.nn.Linear8bitLt):
            held += m.weight.nbytes + (m.weight.SCB.nbytes if getattr(m.weight, "SCB", None) is not None else 0)
            params += m.in_features * m.out_features
    return held, params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--windows", required=True)
    ap.add_argument("--mode", choices=MODES, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--bos-id", type=int, default=None)
    args = ap.parse_args()
    import bitsandbytes
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    before = proc_status()
    model = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=config(args.mode),
                                                 device_map="cpu").eval()
    with torch.inference_mode():
        model(torch.arange(512).reshape(1, 512) % 1000)
    after = proc_status()
    held, params = linear_bytes(model)
    result, _ = score_against_float(model, args.model, load_ids(args.windows), args.bos_id)
    row = {"tool": f"bitsandbytes {bitsandbytes.__version__}", "config": f"bitsandbytes {args.mode}",
           "rss_growth_after_forward": after["VmRSS"] - before["VmRSS"],
           "anon_growth_after_forward": after["RssAnon"] - before["RssAnon"],
           "file_growth_after_forward": after["RssFile"] - before["RssFile"],
           "linear_bytes": held, "linear_params": params, "linear_bits_per_param": held * 8 / params if params else 0,
           "ppl": result["ppl"], "kld": result["kld"], "top1": result["top1"]}
    Path(args.out).write_text(json.dumps(row, indent=2) + "\n")
    print(json.dumps(row))


if __name__ == "__main__":
    main()

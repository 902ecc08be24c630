"""Quantized GGUF files read as lowbit codes and written back (issue 21, part 5).

    python bench/gguf_import.py [--files smollm2-135m smollm2-135m:Q4_0 gemma3-270m gemma3-270m:Q3_K_M ...]
                                [--chunks 8] [--windows 4]

A file is a demo model's source GGUF (``smollm2-135m``: Q4_1; ``gemma3-270m``: Q4_K_M) or, with
``:TYPE``, ``llama-quantize --allow-requantize`` of it to TYPE (types the source does not have; the
weights come from the source's dequantized grid, which is fine here: nothing is scored against a float
model, only a file against itself). For each file:

- ``lowbit.load`` reads it as codes: how many weight matrices became ``QuantLinear`` layers, of which
  schemes, and which tensors were dequantized instead;
- bit identity: every layer's ``dequantize()`` against gguf-py's ``gguf.quants.dequantize`` of the same
  layer written as GGUF blocks (``from_quantized_weight``), compared as float32 bit patterns;
- ``lowbit export-gguf`` without ``--type`` writes it back; the tensors are compared with the input
  file's, byte for byte;
- llama.cpp's ``llama-perplexity`` (the build in out/llama.cpp, 1 thread, ``-c 512 --chunks N``)
  scores the input file and the re-export on the same WikiText-2 raw test text;
- lowbit's own eval (torch) of the codes model and of transformers' float32 load of the file
  (``load(dequantize=True)``) on the first ``--windows`` 512-token windows: the same numbers expected.

Results: bench/results/gguf_import.{json,md}, each file's row written when it finishes; a file whose
row is there (same chunks and windows) is skipped, so a stopped run resumes.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_results import write_results
from llama_cpp_quant import tools_bin

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "gguf_import.json"


def source_file(spec: str, work: Path) -> Path:
    """The GGUF ``spec`` names: a demo's source file, or llama-quantize's requantization of it."""
    from lowbit.sources import DEMO_MODELS, pull

    name, _, qtype = spec.partition(":")
    source = pull(name).parent / "gguf" / DEMO_MODELS[name].gguf_file
    if not qtype:
        return source
    dst = work / f"{name}-{qtype.lower()}.gguf"
    if not dst.exists():
        subprocess.run([str(tools_bin() / "llama-quantize"), "--allow-requantize", str(source), str(dst), qtype, "1"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return dst


def read_as_codes(path: Path) -> tuple[object, object, list[str], float]:
    from lowbit.api import load

    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, tokenizer = load(str(path))
    notes = [str(w.message) for w in caught if "no lowbit codes" in str(w.message)]
    return model, tokenizer, notes, time.perf_counter() - start


def bit_identity(model) -> tuple[int, int]:
    """(layers whose dequantize() equals gguf-py's dequantizer bit for bit, layers)."""
    from gguf.quants import dequantize

    from lowbit.gguf.codes import from_quantized_weight
    from lowbit.nn import quantized_layers

    same = 0
    layers = quantized_layers(model)
    for layer in layers.values():
        qw = layer.quantized_weight()
        qtype, data = from_quantized_weight(qw)
        ours = qw.dequantize().numpy()
        theirs = dequantize(data, qtype).reshape(ours.shape).astype(np.float32)
        same += bool(np.array_equal(ours.view(np.uint32), theirs.view(np.uint32)))
    return same, len(layers)


def compare_tensors(a: Path, b: Path) -> dict[str, int]:
    from gguf import GGUFReader

    A = {t.name: t for t in GGUFReader(a).tensors}
    B = {t.name: t for t in GGUFReader(b).tensors}
    same_type = sum(n in B and B[n].tensor_type == t.tensor_type for n, t in A.items())
    same_bytes = sum(n in B and B[n].tensor_type == t.tensor_type
                     and np.array_equal(np.asarray(B[n].data).view(np.uint8), np.asarray(t.data).view(np.uint8))
                     for n, t in A.items())
    return {"tensors": len(A), "tensors_out": len(B), "same_type": same_type, "byte_identical": same_bytes}


def llama_perplexity(model: Path, text: Path, chunks: int) -> float:
    out = subprocess.run([str(tools_bin() / "llama-perplexity"), "-m", str(model), "-f", str(text), "-c", "512",
                          "--chunks", str(chunks), "-t", "1", "-b", "512"],
                         check=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True).stdout
    found = re.search(r"Final estimate: PPL = ([0-9.]+)", out)
    if found is None:
        raise RuntimeError(f"llama-perplexity printed no final estimate for {model}:\n{out[-2000:]}")
    return float(found.group(1))


def lowbit_ppl(model, tokenizer, windows: int) -> float:
    from lowbit.evaluate.perplexity import evaluate_windows
    from lowbit.evaluate.text import default_eval_path, read_text, token_windows
    from lowbit.nn import prepare_kernels
    from lowbit.sources import needs_bos

    prepare_kernels(model, activations="float32")
    ids = token_windows(read_text(default_eval_path()), tokenizer, 512, windows)
    bos = tokenizer.bos_token_id if needs_bos(tokenizer) else None
    return evaluate_windows(model, ids, bos_id=bos, progress=False).ppl


def run_file(spec: str, work: Path, chunks: int, windows: int) -> dict:
    import torch

    from lowbit.api import export, load
    from lowbit.evaluate.text import default_eval_path
    from lowbit.nn import quantized_layers

    torch.set_num_threads(1)
    path = source_file(spec, work)
    model, tokenizer, notes, seconds = read_as_codes(path)
    schemes = Counter(layer.quantized_weight().scheme.describe() for layer in quantized_layers(model).values())
    same, layers = bit_identity(model)
    again = work / f"{path.stem}.lowbit.gguf"
    export(model, tokenizer, again, to="gguf", overwrite=True, progress=False)
    row = {"file": spec, "path": path.name, "load_seconds": round(seconds, 1), "layers": layers,
           "schemes": dict(schemes), "dequantized": notes, "bit_identical_layers": same,
           **compare_tensors(path, again)}
    text = default_eval_path()
    row["llama_ppl_in"] = llama_perplexity(path, text, chunks)
    row["llama_ppl_out"] = llama_perplexity(again, text, chunks)
    row["lowbit_ppl_codes"] = lowbit_ppl(model, tokenizer, windows)
    del model
    floats, float_tokenizer = load(str(path), dequantize=True)
    row["lowbit_ppl_float"] = lowbit_ppl(floats, float_tokenizer, windows)
    return row


def table(rows: list[dict], chunks: int, windows: int) -> list[str]:
    lines = [f"GGUF files read as lowbit codes and written back; llama-perplexity 1 thread, {chunks} chunks of 512 "
             f"tokens of WikiText-2 raw test; lowbit eval on the first {windows} windows of 512.", "",
             "| file | layers as codes (schemes) | bit-identical to gguf-py | tensors byte-identical after export-gguf "
             "| llama.cpp ppl in | llama.cpp ppl re-export | lowbit ppl codes | lowbit ppl float load | load s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        schemes = "; ".join(f"{n} {s}" for s, n in sorted(r["schemes"].items(), key=lambda kv: -kv[1]))
        lines.append(f"| {r['file']} ({r['path']}) | {r['layers']} ({schemes}) "
                     f"| {r['bit_identical_layers']}/{r['layers']} | {r['byte_identical']}/{r['tensors']} | {r['llama_ppl_in']:.4f} | {r['llama_ppl_out']:.4f} "
                     f"| {r['lowbit_ppl_codes']:.4f} | {r['lowbit_ppl_float']:.4f} | {r['load_seconds']} |")
    notes = [f"- {r['file']}: {n}" for r in rows for n in r["dequantized"]]
    return lines + ([""] + notes if notes else [])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--files", nargs="+", default=["smollm2-135m", "smollm2-135m:Q4_0", "gemma3-270m", "gemma3-270m:Q3_K_M",
                                                  "gemma3-270m:IQ4_XS", "gemma3-270m:Q2_K"])
    p.add_argument("--chunks", type=int, default=8)
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--work", type=Path, default=ROOT / "out" / "gguf_import")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    previous = json.loads(OUT.read_text()) if OUT.exists() else {}
    settings = {"chunks": args.chunks, "windows": args.windows}
    rows = [r for r in previous.get("rows", []) if previous.get("settings") == settings and r["file"] in args.files]
    for spec in args.files:
        if any(r["file"] == spec for r in rows):
            continue
        rows.append(run_file(spec, args.work, args.chunks, args.windows))
        rows.sort(key=lambda r: args.files.index(r["file"]))
        write_results(OUT, {"settings": settings, "rows": rows}, table(rows, args.chunks, args.windows))
        print(json.dumps(rows[-1]), flush=True)
    print("\n".join(table(rows, args.chunks, args.windows)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""lowbit's CPU kernels (``lowbit.kernels``) against float32, the reference path and torch's own
packed low-bit kernels, on the linear shapes of SmolLM2-135M (its LM head included).

Per ``[M, K] x [K, N]`` product and thread count, median microseconds of:
- ``float32``: ``F.linear`` on the float weight (MKL);
- ``reference``: what ``QuantLinear`` does today, ``F.linear(x, qw.dequantize())`` (int4 g64 asym);
- ``torch int4``: ``aten._weight_int4pack_mm_for_cpu`` (groups of 64, ``w = (q - 8) s + z``: the
  same weights as lowbit's int4 g64 with a float minimum, which the next column runs);
- ``torch int8``: ``aten._weight_int8pack_mm`` (int8 per channel, symmetric), against lowbit's int8
  per channel;
- lowbit's kernels on int4 g64 asym (integer zero-point), nf4 g64 with double quantization and int3
  g64 asym; and int4 g64 asym through ``linear_bf16_prefill`` (M >= 16 only: below, it is ``linear``),
  whose error against the reference (``bf16_rel_err``: ||y - y_ref|| / ||y_ref|| at M = 128) the
  JSON records per shape.
SmolLM2-135M's own weights (layer 3, and the tied embedding as LM head) quantized by RTN, random
activations; one run, the columns of a row measured back to back (the machine
is shared: compare ratios, not absolute times). Rows are written as they finish. ``hot`` rows
repeat the product on weights that stay in cache; ``cold`` rows (M = 1) evict the caches before
each call, as decoding a model whose weights exceed the L3 cache does.

Run: ``python bench/matmul_kernels.py`` (``--quick`` for M = 1 and 4 only); results go to
``bench/results/kernels.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
LAYERS = {  # (K, N) -> the SmolLM2-135M weight of that shape the products use (the LM head is the tied embedding)
    (576, 576): "model.layers.3.self_attn.q_proj.weight",
    (576, 192): "model.layers.3.self_attn.k_proj.weight",
    (576, 1536): "model.layers.3.mlp.up_proj.weight",
    (1536, 576): "model.layers.3.mlp.down_proj.weight",
    (576, 49152): "model.embed_tokens.weight",
}
TOKENS = (1, 4, 128, 512)
THREADS = (1, 2)
SKIP_SECONDS = 5.0
SCHEMES = {  # column -> lowbit scheme
    "int4_g64_fmin": dict(format="int", bits=4, group_size=64, symmetric=False, zero_point="float"),
    "int4_g64_asym": dict(format="int", bits=4, group_size=64, symmetric=False),
    "int8_channel": dict(format="int", bits=8, granularity="channel"),
    "nf4_g64_dq": dict(format="nf4", bits=4, group_size=64, double_quant=True),
    "int3_g64_asym": dict(format="int", bits=3, group_size=64, symmetric=False),
}


def _time(fn, min_seconds: float = 0.15) -> float:
    """Fastest call over at least ``min_seconds`` of calls (3 at least), after a warm-up: on a machine
    shared with other work, the minimum is the estimate least disturbed by it."""
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < 3 or time.perf_counter() - start < min_seconds:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


_EVICT = torch.ones(32 << 20)  # 128 MiB: larger than the L3 of the machines this runs on


def _time_cold(fn, calls: int = 8) -> float:
    """Fastest call with the caches flushed before each (by summing a large buffer)."""
    fn()
    times = []
    for _ in range(calls):
        _EVICT.sum()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def torch_int4(qw) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's CPU int4 layout of a lowbit int4 g64 float-minimum weight: the same values, since
    ``q s + m = (q - 8) s + (m + 8 s)``."""
    N, K = qw.shape
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(qw.codes().to(torch.int32), 2)
    s, m = qw.scales(), qw.zeros()
    scale_zero = torch.stack([s, m + 8 * s], dim=-1).transpose(0, 1).contiguous()  # [K / g, N, 2]
    return packed, scale_zero


def measure(K: int, N: int, weights: dict, M: int, cold: bool, previous: dict, record: bool) -> dict:
    """Microseconds per product of every column; a column whose 1-thread time at a smaller M (recorded
    in ``previous`` when ``record``) projects past ``SKIP_SECONDS`` at this M is not measured (None):
    torch's packed kernels take minutes on the LM head."""
    from lowbit.kernels import linear, linear_bf16_prefill
    from lowbit.kernels.cpu import GEMM_MIN_ROWS

    x = torch.randn(M, K)
    w = weights["float"]
    ref_qw = weights["int4_g64_asym"][0]
    packed, scale_zero = weights["torch_int4"]
    w8, s8 = weights["torch_int8"]
    columns = {
        "float32": lambda: F.linear(x, w),
        "reference": lambda: F.linear(x, ref_qw.dequantize()),
        "torch_int4": lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 64, scale_zero),
        "torch_int8": lambda: torch.ops.aten._weight_int8pack_mm(x, w8, s8),
    }
    for name in SCHEMES:
        columns[name] = lambda prepared=weights[name][1]: linear(x, prepared, None)
    if M >= GEMM_MIN_ROWS:
        columns["int4_g64_asym_bf16"] = lambda: linear_bf16_prefill(x, weights["int4_g64_asym"][1], None)
    out = {"int4_g64_asym_bf16_us": None}
    for name, fn in columns.items():
        last = previous.get(name)
        if last is not None and last[0] * M / last[1] > SKIP_SECONDS:
            out[f"{name}_us"] = None
            continue
        seconds = _time_cold(fn) if cold else _time(fn)
        if record and not cold:
            previous[name] = (seconds, M)
        out[f"{name}_us"] = seconds * 1e6
    return out


def check(K: int, weights: dict) -> float:
    """Every timed path computes the same product (torch's kernels included) before it is timed;
    returns the relative error of the bfloat16 prefill option at M = 128."""
    from lowbit.kernels import linear, linear_bf16_prefill

    x = torch.randn(3, K)
    qw, prepared = weights["int4_g64_fmin"]
    ref = F.linear(x, qw.dequantize())
    tol = 1e-4 * float(ref.abs().max())
    torch.testing.assert_close(linear(x, prepared, None), ref, atol=tol, rtol=0)
    packed, scale_zero = weights["torch_int4"]
    torch.testing.assert_close(torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 64, scale_zero), ref,
                               atol=tol, rtol=0)
    qw8 = weights["int8_channel"][0]
    w8, s8 = weights["torch_int8"]
    torch.testing.assert_close(torch.ops.aten._weight_int8pack_mm(x, w8, s8), F.linear(x, qw8.dequantize()),
                               atol=tol, rtol=1e-4)
    qw, prepared = weights["int4_g64_asym"]
    x = torch.randn(128, K)
    ref = F.linear(x, qw.dequantize())
    return float((linear_bf16_prefill(x, prepared, None) - ref).norm() / ref.norm())


def build_weights(w: torch.Tensor) -> dict:
    from lowbit.kernels import prepare
    from lowbit.methods.rtn import quantize_rtn
    from lowbit.scheme import QuantScheme

    N = w.shape[0]
    weights: dict = {"float": w}
    for name, fields in SCHEMES.items():
        qw = quantize_rtn(w, QuantScheme(**fields))
        weights[name] = (qw, prepare(qw))
    weights["torch_int4"] = torch_int4(weights["int4_g64_fmin"][0])
    qw8 = weights["int8_channel"][0]
    weights["torch_int8"] = ((qw8.codes().to(torch.int16) - 128).to(torch.int8), qw8.scales().reshape(N))
    return weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="M = 1 and 4 only")
    args = parser.parse_args()
    from lowbit.kernels import status

    problem = status()
    if problem is not None:
        sys.exit(f"lowbit kernels unavailable: {problem}")
    torch.manual_seed(0)
    meta = {"command": "python bench/matmul_kernels.py" + (" --quick" if args.quick else ""), "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "isa": torch.ops.lowbit_kernels.isa(),
            "date": time.strftime("%Y-%m-%d %H:%M")}
    from safetensors import safe_open

    from lowbit.sources import pull

    rows = []
    out = ROOT / "bench" / "results" / "kernels"
    with torch.inference_mode(), safe_open(str(pull("smollm2-135m") / "model.safetensors"), "pt") as f:
        for (K, N), name in LAYERS.items():
            weights = build_weights(f.get_tensor(name).float())
            meta.setdefault("bf16_rel_err", {})[f"{K}x{N}"] = check(K, weights)
            previous = {}
            for M, cache in [(1, "cold")] + [(M, "hot") for M in (TOKENS[:2] if args.quick else TOKENS)]:
                for threads in THREADS:
                    torch.set_num_threads(threads)
                    row = {"K": K, "N": N, "M": M, "cache": cache, "threads": threads,
                           **measure(K, N, weights, M, cache == "cold", previous, threads == 1)}
                    rows.append(row)
                    print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()}),
                          file=sys.stderr, flush=True)
                    out.with_suffix(".json").write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
                    out.with_suffix(".md").write_text(markdown(meta, rows))
    print(markdown(meta, rows))


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [(f"lowbit CPU kernels ({meta['isa']}), torch {meta['torch']}, {meta['date']}; `{meta['command']}`. "
              "Microseconds per product (fastest of repeated calls); x = float32 time / that time (above 1: "
              "faster than float32); vs torch = torch's packed kernel time / lowbit's on the same weights (int4 g64 "
              f"float-min, int8 per channel); - : not measured (projected past {SKIP_SECONDS:.0f} s per call)."), "",
             ("| M x K x N | cache | thr | float32 | reference | torch int4 | lowbit int4 fmin | x | vs torch | torch int8 "
              "| lowbit int8 | x | vs torch | lowbit int4 asym | x | nf4 dq | x | int3 asym | x | int4 asym bf16 | x |"),
             "|---|---|---:|" + "---:|" * 19]

    def us(v):
        return "-" if v is None else f"{v:.1f}"

    def ratio(a, b):
        return "-" if a is None or b is None else f"{a / b:.2f}"

    for r in rows:
        f = r["float32_us"]
        cells = [f"{r['M']} x {r['K']} x {r['N']}", r["cache"], str(r["threads"]), us(f), us(r["reference_us"]),
                 us(r["torch_int4_us"]), us(r["int4_g64_fmin_us"]), ratio(f, r["int4_g64_fmin_us"]),
                 ratio(r["torch_int4_us"], r["int4_g64_fmin_us"]), us(r["torch_int8_us"]), us(r["int8_channel_us"]),
                 ratio(f, r["int8_channel_us"]), ratio(r["torch_int8_us"], r["int8_channel_us"])]
        for name in ("int4_g64_asym_us", "nf4_g64_dq_us", "int3_g64_asym_us", "int4_g64_asym_bf16_us"):
            cells += [us(r[name]), ratio(f, r[name])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

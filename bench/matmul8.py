"""8-bit matrix products against float32 on this machine, for the linear shapes of the demo models.

For each ``[M, K] x [K, N]`` product: float32 ``F.linear`` (MKL), the int8 kernel alone
(``torch._int_mm``, int32 out), the FP8 kernel alone (``torch._scaled_mm``), and a whole
``ActQuantLinear`` forward (dynamic per-token activation quantization, the product, the rescale),
which is what a W8A8 model pays per layer, and the same layer rotating its input online
(``--rotate`` does so for ``down_proj``: a Hadamard transform of the ``[M, K]`` input first).
Median of repeated runs after a warm-up; the ratio is
float time / 8-bit time (above 1: the 8-bit path is faster). Whether integer is faster depends on
the CPU (AVX512-VNNI / AMX) and on M: small M is memory-bound, where 8-bit weights read 4x fewer bytes.

Run: ``python bench/matmul8.py`` (threads: torch's default, i.e. the machine's cores);
results go to ``bench/results/matmul8.{json,md}``.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {  # (K, N) of each distinct linear
    "smollm2-135m": [(576, 576), (576, 192), (576, 1536), (1536, 576)],
    "gemma3-270m": [(640, 1024), (640, 256), (1024, 640), (640, 2048), (2048, 640)],
}
TOKENS = (1, 16, 512, 2048)


def _time(fn, min_seconds: float = 0.2) -> float:
    """Median seconds per call over at least ``min_seconds`` of calls (3 at least), after 2 warm-ups."""
    fn()
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < 3 or time.perf_counter() - start < min_seconds:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    from lowbit.act_scheme import ActScheme
    from lowbit.methods.rtn import quantize_rtn
    from lowbit.nn import QuantLinear
    from lowbit.nn.act_linear import ActQuantLinear
    from lowbit.nn.input_hadamard import add_input_hadamard

    torch.manual_seed(0)
    rows = []
    act = ActScheme()
    for model, shapes in SHAPES.items():
        for K, N in shapes:
            w = torch.randn(N, K)
            layer = ActQuantLinear.from_quant_linear(QuantLinear.from_quantized(quantize_rtn(w, act.weight_scheme())),
                                                     act)
            rotated = ActQuantLinear.from_quant_linear(layer, act)
            add_input_hadamard(rotated)
            b_int8, _ = layer.weight_operand()  # the transposed view the layer passes
            b_fp8 = w.t().contiguous().clamp(-448, 448).to(torch.float8_e4m3fn)
            for M in TOKENS:
                row = {"model": model, "M": M, "K": K, "N": N,
                       **_measure(torch.randn(M, K), w, layer, rotated, b_int8, b_fp8)}
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    meta = {"command": "python bench/matmul8.py", "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d"),
            "cpu_flags": _cpu_flags()}
    out = ROOT / "bench" / "results" / "matmul8"
    out.with_suffix(".json").write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(meta, rows))
    print(markdown(meta, rows))


def _measure(x: torch.Tensor, w: torch.Tensor, layer, rotated, b_int8: torch.Tensor, b_fp8: torch.Tensor) -> dict:
    """Microseconds of the five ways to compute ``x @ w.T`` (the 8-bit kernels on random codes)."""
    a_int8 = torch.randint(-127, 128, x.shape, dtype=torch.int8)
    a_fp8 = x.to(torch.float8_e4m3fn)
    one = torch.ones(())
    f32 = _time(lambda: F.linear(x, w))
    i8 = _time(lambda: torch._int_mm(a_int8, b_int8))
    f8 = _time(lambda: torch._scaled_mm(a_fp8, b_fp8, scale_a=one, scale_b=one, out_dtype=torch.float32))
    with torch.inference_mode():
        w8a8 = _time(lambda: layer(x))
        w8a8_rotated = _time(lambda: rotated(x))
    return {"float32_us": f32 * 1e6, "int8_mm_us": i8 * 1e6, "fp8_scaled_mm_us": f8 * 1e6, "w8a8_layer_us": w8a8 * 1e6,
            "w8a8_rotated_us": w8a8_rotated * 1e6}


def _cpu_flags() -> list[str]:
    """The CPU's 8-bit dot-product extensions, from /proc/cpuinfo (Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return []
    return sorted(f for f in flags if f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16",
                                             "avx512_bf16", "amx_fp16"))


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [(f"8-bit products vs float32, {meta['threads']} threads, torch {meta['torch']}, CPU flags "
              f"{', '.join(meta['cpu_flags']) or 'unknown'}; `{meta['command']}`. Times in microseconds; "
              "ratio = float32 time / 8-bit time."), "",
             ("| model | M x K x N | float32 | int8 _int_mm | ratio | fp8 _scaled_mm | ratio | W8A8 layer | ratio "
              "| W8A8 + online Hadamard | ratio |"),
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        f = r["float32_us"]
        lines.append(f"| {r['model']} | {r['M']} x {r['K']} x {r['N']} | {f:.1f} | {r['int8_mm_us']:.1f} | "
                     f"{f / r['int8_mm_us']:.2f} | {r['fp8_scaled_mm_us']:.1f} | {f / r['fp8_scaled_mm_us']:.2f} | "
                     f"{r['w8a8_layer_us']:.1f} | {f / r['w8a8_layer_us']:.2f} | {r['w8a8_rotated_us']:.1f} | "
                     f"{f / r['w8a8_rotated_us']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

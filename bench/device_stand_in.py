"""The ``--device cuda`` plumbing on a real model, on a machine without a GPU: ``lowbit quantize`` run on
the CPU and through the stand-in CUDA device of the tests (``tests/pipeline/fake_cuda.py``: tensors that
say they are on cuda:0, CUDA's refusal of mixed-device ops, the CPU's arithmetic), then every tensor of
the two checkpoints compared. Equal tensors mean every block, argument and statistic reached the device
and the result came back; they say nothing of CUDA's own arithmetic or speed (``bench/device_check.py``
measures those on a GPU). The stand-in's time is Python overhead per op, not a GPU timing.

Run: ``python bench/device_stand_in.py --model smollm2-135m --method gptq`` (2 cores: about 5 minutes).
Writes ``bench/results/device_stand_in_<model>.json`` and ``.md``, one row per method (rows are kept).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SETTING = ["--bits", "4", "--group-size", "64", "--asym"]  # int4 g64 with integer zero-points


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", default="gptq", help="a --method of lowbit quantize (gptq, awq, awq+gptq, rtn ...)")
    ap.add_argument("--calib-samples", type=int, default=8)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    import pytest
    from safetensors.torch import load_file

    from lowbit.cli import main as lowbit
    from tests.pipeline.fake_cuda import fake_cuda

    common = ["--method", args.method, *SETTING, "--calib-samples", str(args.calib_samples), "--quiet"]
    seconds = {}
    with tempfile.TemporaryDirectory() as tmp:
        for device in ("cpu", "cuda"):
            start = time.perf_counter()
            with pytest.MonkeyPatch.context() as patch:
                with fake_cuda(patch) if device == "cuda" else contextlib.nullcontext():
                    status = lowbit(["quantize", args.model, "-o", str(Path(tmp) / device), "--device", device, *common])
            if status != 0:
                raise SystemExit(f"lowbit quantize --device {device} exited with {status}")
            seconds[device] = time.perf_counter() - start
        cpu, cuda = (_tensors(Path(tmp) / d, load_file) for d in ("cpu", "cuda"))
        shutil.rmtree(tmp, ignore_errors=True)
    differ = sorted(k for k in cpu if k not in cuda or not torch.equal(cpu[k], cuda[k]))
    row = {"method": args.method, "setting": "int4 g64 asym", "calibration": f"{args.calib_samples}x512",
           "tensors": len(cpu), "identical": not differ and cpu.keys() == cuda.keys(), "differ": differ[:10],
           "cpu_seconds": seconds["cpu"], "stand_in_seconds": seconds["cuda"]}
    out = ROOT / "bench" / "results" / f"device_stand_in_{Path(args.model).name}.json"
    rows = json.loads(out.read_text())["rows"] if out.is_file() else []
    rows = [r for r in rows if r["method"] != args.method] + [row]
    from bench_results import write_results

    meta = {"command": " ".join(["python", "bench/device_stand_in.py", *sys.argv[1:]]), "model": Path(args.model).name,
            "torch": torch.__version__, "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")}
    write_results(out, {**meta, "rows": rows}, _markdown(meta, rows))
    print("\n".join(_markdown(meta, rows)))


def _tensors(checkpoint: Path, load_file) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(checkpoint.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def _markdown(meta: dict, rows: list[dict]) -> list[str]:
    lines = [f"{meta['model']}: `lowbit quantize` on the CPU and through the stand-in CUDA device "
             f"(tests/pipeline/fake_cuda.py), every checkpoint tensor compared; `{meta['command']}`", "",
             "| method | setting | calibration | tensors | identical | CPU s | stand-in s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['setting']} | {r['calibration']} | {r['tensors']} | "
                     f"{'yes' if r['identical'] else 'NO: ' + ', '.join(r['differ'])} | {r['cpu_seconds']:.0f} | "
                     f"{r['stand_in_seconds']:.0f} |")
    lines += ["", "Not a GPU measurement: the stand-in computes on the CPU; its time is Python overhead per op."]
    return lines


if __name__ == "__main__":
    main()

"""Without the compiled kernels (``LOWBIT_KERNELS=0``, or a machine where they cannot build),
``status`` says why in one line and the reference path still computes quantized layers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import torch
from lowbit.kernels import status, supports
from lowbit.nn import QuantLinear
from lowbit.qweight import QuantizedWeight
from lowbit.scheme import QuantScheme

scheme = QuantScheme(bits=4, group_size=64)
codes = torch.randint(0, 16, (8, 128), dtype=torch.uint8)
qw = QuantizedWeight.from_codes(codes, torch.full((8, 2), 0.01), None, scheme)
layer = QuantLinear.from_quantized(qw)
x = torch.randn(3, 128)
assert torch.equal(layer(x), torch.nn.functional.linear(x, qw.dequantize()))
assert supports(scheme) is None
print(status())
"""


def test_reference_path_runs_when_kernels_are_disabled():
    env = {**os.environ, "LOWBIT_KERNELS": "0", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "disabled by LOWBIT_KERNELS=0"


def test_a_failed_build_is_reported_in_one_line(tmp_path):
    env = {**os.environ, "CXX": "/bin/false", "LOWBIT_HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
    env.pop("LOWBIT_KERNELS", None)  # a build must be attempted even when the suite runs with the kernels off
    code = "from lowbit.kernels import status; print(status())"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1].startswith("not built: ")

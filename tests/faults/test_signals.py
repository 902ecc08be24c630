"""What only a real process shows: the exit status the shell sees, and Ctrl-C (SIGINT) arriving
while a command works. A subprocess costs seconds of imports, so there are two."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _lowbit(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "lowbit", *map(str, args)], env=env, cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_a_usage_error_exits_2_with_one_line():
    proc = _lowbit("quantize", "m", "-o", "o", "--bits", "four")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert len(err.strip().splitlines()) == 1 and "invalid int value: 'four'" in err


def test_ctrl_c_while_quantizing_exits_130_with_one_line_and_leaves_nothing(tiny_llama_dir, tmp_path):
    """SIGINT once the output is reserved (its lock file exists), that is in the slow part: one line,
    exit 130, nothing at the output name (no output, no partial, no lock)."""
    out = tmp_path / "out"
    lock = tmp_path / ".out.lock"
    proc = _lowbit("quantize", tiny_llama_dir, "-o", out, "--method", "gptq", "--calib-samples", "64",
                   "--calib-seqlen", "256", "--quiet")
    deadline = time.monotonic() + 120
    while not lock.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lock.exists(), proc.communicate()[1]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert len(err.strip().splitlines()) == 1 and "interrupted" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []

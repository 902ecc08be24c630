"""Where computation runs: the ``--device`` choice and moving a block's arguments there.

lowbit keeps the model, its checkpoints and every ``QuantizedWeight`` it returns on the CPU; a
device other than the CPU is where the work happens: a decoder block, its calibration activations
and its statistics while the pipeline quantizes it (``lowbit.pipeline.sequential``), the model while
an evaluator runs it (``lowbit.evaluate.perplexity``). What the compiled kernels, the GGUF writer
and the savers see is always on the CPU.

Choices (``DEVICES``): ``"cpu"`` (the default, byte-identical to a build without this option),
``"cuda"`` / ``"cuda:N"``, and ``"auto"``: CUDA when ``torch.cuda.is_available()``, else the CPU.
A CUDA device that is absent is refused before any work, in one line (not a fallback to the CPU:
a job asked to run on a GPU that silently takes hours on the CPU is a worse failure).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import torch

DEVICES = ("cpu", "cuda", "cuda:N", "auto")


def resolve_device(spec: str | torch.device | None) -> torch.device:
    """The ``torch.device`` that ``spec`` names (None: the CPU).

    Raises:
        ValueError: a name other than ``DEVICES``, or a CUDA device this process cannot use (no CUDA
            build or driver, or an index past ``torch.cuda.device_count()``), saying what to use.
    """
    if spec is None:
        return torch.device("cpu")
    if isinstance(spec, str) and spec == "auto":
        return resolve_device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {spec!r}; use one of {', '.join(DEVICES)}") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise ValueError(f"device {spec!r} is not supported; use one of {', '.join(DEVICES)}")
    if not torch.cuda.is_available():
        raise ValueError(f"device {spec!r} asked for, but CUDA is not available in this process (no GPU, driver "
                         "or CUDA build of torch); use --device cpu, or --device auto to take a GPU when there is one")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ValueError(f"device {spec!r} asked for, but this process sees {count} CUDA device(s) "
                         f"(cuda:0 to cuda:{count - 1}); check CUDA_VISIBLE_DEVICES")
    return torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)


def to_device(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor inside it (nested in tuples, lists and dicts) on ``device``; other
    values, and tensors already there, are passed through as they are (the same objects)."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(to_device(v, device) for v in value)
    if isinstance(value, list):
        return [to_device(v, device) for v in value]
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


# /proc/cpuinfo flags of CPUs that compute in bfloat16 natively: x86's AVX512-BF16 and AMX, Arm's BF16
_BFLOAT16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


@cache
def cpu_has_bfloat16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool | None:
    """Whether this CPU has bfloat16 instructions; None where ``cpuinfo`` cannot be read (not Linux).

    Why: without them torch emulates bfloat16 through float32 conversions, and autocast then slows a
    CPU down instead of speeding it up (a QAT step of SmolLM2: 151.8 s against float32's 14.5 s on an
    AVX2-only AMD EPYC; 6.6 s against 9.3 s on a CPU with AVX512-BF16, ``bench/qat_step_time.py``)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return None
    flags = {flag for line in text.splitlines() if line.split(":")[0].strip() in ("flags", "Features")
             for flag in line.split(":", 1)[1].split()}
    return bool(flags & _BFLOAT16_FLAGS)

"""Speed and memory measurements that are honest about what they measure.

* :func:`forward_throughput` times a full forward pass on fixed-seed random ids: one untimed
  warm-up (allocator, kernels, lazy init), then the median of several timed repeats, with the
  accelerator synchronised so asynchronous launches are not mistaken for speed.
* :func:`process_rss_bytes` / :func:`peak_rss_bytes` read the real resident memory of this
  process from the kernel, instead of adding up tensor sizes, so packed weights, dequantisation
  buffers and allocator overhead are all counted.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch

__all__ = ["forward_throughput", "huge_page_bytes", "measure_load", "peak_rss_bytes", "process_rss_bytes"]

T = TypeVar("T")

_PROC_STATUS = Path("/proc/self/status")
_PROC_SMAPS_ROLLUP = Path("/proc/self/smaps_rollup")


def _sync(device: torch.device) -> None:
    """Wait for queued accelerator work so wall-clock timings cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _infer_vocab_size(model: Any) -> int:
    """Vocabulary size from the config, falling back to the input embedding table."""
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if vocab is None and config is not None and hasattr(config, "get_text_config"):
        vocab = getattr(config.get_text_config(), "vocab_size", None)
    if vocab is None and hasattr(model, "get_input_embeddings"):
        vocab = model.get_input_embeddings().num_embeddings
    if vocab is None:
        raise ValueError("cannot infer the vocabulary size; pass vocab_size=")
    return int(vocab)


def forward_throughput(
    model: torch.nn.Module,
    seqlen: int = 512,
    batch: int = 1,
    repeats: int = 3,
    vocab_size: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Tokens per second of a full-sequence forward pass (prefill-style), median of ``repeats``.

    Input ids are drawn uniformly from ``[0, vocab_size)`` with a fixed ``seed`` on the CPU (so
    they are the same on every device). ``vocab_size`` defaults to the model's config. Returns
    ``tokens_per_second`` (median), ``seconds_median``, the raw ``seconds`` of each repeat and
    the settings used.
    """
    if seqlen < 1 or batch < 1 or repeats < 1:
        raise ValueError(f"seqlen, batch and repeats must be >= 1, got {seqlen}, {batch}, {repeats}")
    vocab = int(vocab_size) if vocab_size is not None else _infer_vocab_size(model)
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seqlen), generator=gen).to(device)
    kwargs = {"use_cache": False} if hasattr(model, "config") else {}

    was_training = bool(getattr(model, "training", False))
    model.eval()
    times: list[float] = []
    try:
        with torch.inference_mode():
            for i in range(repeats + 1):  # the first pass is the warm-up
                _sync(device)
                t0 = time.perf_counter()
                model(input_ids=ids, **kwargs) if kwargs else model(ids)
                _sync(device)
                if i > 0:
                    times.append(time.perf_counter() - t0)
    finally:
        if was_training:
            model.train()

    median = statistics.median(times)
    return {
        "tokens_per_second": batch * seqlen / median if median > 0 else float("inf"),
        "seconds_median": median,
        "seconds": times,
        "seqlen": seqlen,
        "batch": batch,
        "repeats": repeats,
        "device": str(device),
    }


def measure_load(fn: Callable[[], T]) -> tuple[T, float]:
    """Call ``fn()`` and return ``(its result, wall seconds)`` - e.g. to time model loading."""
    t0 = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - t0


def _proc_status_kib(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (Linux), or ``None`` where unavailable."""
    try:
        for line in _PROC_STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def process_rss_bytes() -> int | None:
    """Current resident set size of this process in bytes (``VmRSS``); ``None`` off Linux."""
    kib = _proc_status_kib("VmRSS")
    return kib * 1024 if kib is not None else None


def huge_page_bytes() -> int | None:
    """Bytes of this process's memory now in transparent huge pages (``AnonHugePages`` of
    ``/proc/self/smaps_rollup``): how much of the kernels' layouts got them (``lowbit.kernels.huge_pages``);
    ``None`` off Linux."""
    try:
        for line in _PROC_SMAPS_ROLLUP.read_text().splitlines():
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_rss_bytes() -> int:
    """Peak resident set size of this process in bytes (``VmHWM``, else ``getrusage``)."""
    kib = _proc_status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    import resource  # POSIX only; imported here so the module still imports elsewhere

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in bytes on macOS and in KiB on Linux and the BSDs.
    return int(maxrss) if sys.platform == "darwin" else int(maxrss) * 1024

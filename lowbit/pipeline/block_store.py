"""Finished blocks and the activations that feed the next one, on disk: bounded memory and resume.

A calibrated job over a model larger than memory cannot keep its quantized blocks either (int4
codes of a 7B model are 3.5 GB), nor always its activations (``[samples, seqlen, hidden]`` float32,
403 MB for Qwen2.5-1.5B at 128 x 512). With a ``BlockStore`` the activations live in two files
mapped into memory (``activations``: the kernel writes their pages back and drops them under a
memory limit), the driver writes each finished block's tensors and layer records to
``<dir>/block-NNNN.safetensors`` and its outputs into the other activation file, then the count of
finished blocks to ``<dir>/progress.json`` (through a temporary name and a rename, last, so a job
killed at any point leaves a consistent store), and drops the block from memory. Run again with the same
model, recipe and calibration, it skips the finished blocks and goes on from the stored activations;
a store made by another job is refused with one line. ``lowbit.pipeline.streamed_save`` assembles
the checkpoint from the store.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lowbit.io.sharded import ShardedReader, write_safetensors
from lowbit.nn.records import layer_records

PROGRESS = "progress.json"
ACTIVATIONS = "activations-{}.f32"  # two buffers: the inputs of the next block, and its outputs being written


def fingerprint(*parts: Any) -> str:
    """SHA-256 of the job's identity: its recipe, calibration token ids and model description."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, Tensor):
            h.update(str((part.dtype, tuple(part.shape))).encode())
            h.update(part.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()


class BlockStore:
    """The on-disk state of one calibrated job (see the module docstring)."""

    def __init__(self, directory: str | Path, job: str) -> None:
        self.directory = Path(directory)
        self.job = job

    def done(self) -> int:
        """How many blocks are finished (0 for a new store).

        Raises:
            ValueError: the store belongs to another job (model, recipe or calibration), or is damaged.
        """
        path = self.directory / PROGRESS
        if not path.is_file():
            return 0
        try:
            progress = json.loads(path.read_text())
            done, job = int(progress["done"]), progress["job"]
        except (OSError, ValueError, KeyError, TypeError):
            raise ValueError(f"{path} is damaged; delete {self.directory} to start the job again") from None
        if job != self.job:
            raise ValueError(f"{self.directory} holds the progress of another job (another model, recipe or "
                             "calibration); pass another --work-dir or delete it")
        return done

    def block_path(self, i: int) -> Path:
        return self.directory / f"block-{i:04d}.safetensors"

    def save(self, i: int, block: nn.Module, prefix: str, report: dict[str, Any]) -> None:
        """Record block ``i`` (named ``prefix``, e.g. ``model.layers.3.``), finished, with what the
        report says of it; its outputs are already in ``next_activations``' buffer."""
        self.directory.mkdir(parents=True, exist_ok=True)
        state = {prefix + k: v.contiguous() for k, v in block.state_dict().items()}
        records = {prefix + k: r.to_entry() for k, r in layer_records(block).items()}
        meta = {"records": json.dumps(records, sort_keys=True), "report": json.dumps(report, sort_keys=True)}
        _atomic(self.block_path(i), lambda p: write_safetensors(p, state, meta))
        _atomic(self.directory / PROGRESS,
                lambda p: Path(p).write_text(json.dumps({"done": i + 1, "job": self.job}) + "\n"))

    def activations(self, captured: Tensor, done: int) -> Tensor:
        """The inputs of block ``done`` as a file-backed tensor shaped like ``captured`` (block 0's
        inputs): ``captured`` itself copied to disk for a new job, the stored buffer on resume."""
        buffer = self._buffer(done % 2, captured)
        if done == 0:
            buffer.copy_(captured)
        return buffer

    def next_activations(self, i: int, hidden: Tensor) -> Tensor:
        """A copy of block ``i``'s inputs ``hidden`` in the other buffer, for its outputs to overwrite:
        the inputs stay intact until block ``i`` is recorded as finished."""
        buffer = self._buffer((i + 1) % 2, hidden)
        buffer.copy_(hidden)
        return buffer

    def _buffer(self, k: int, like: Tensor) -> Tensor:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / ACTIVATIONS.format(k)
        with open(path, "ab") as f:
            f.truncate(like.numel() * 4)
        return torch.from_file(str(path), shared=True, size=like.numel(), dtype=torch.float32).view(like.shape)

    def block_meta(self, i: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """(layer records by full name, report entries) of finished block ``i``."""
        meta = ShardedReader.file_metadata(self.block_path(i))
        return json.loads(meta["records"]), json.loads(meta["report"])


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(str(tmp))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)

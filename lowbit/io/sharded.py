"""Sharded safetensors read and written one tensor at a time, for models larger than memory.

``safetensors.torch.save_file`` wants every tensor of a file in memory at once and ``safe_open``
maps the whole file (under a cgroup memory limit the page cache counts, and a mapping's pages stay
charged until reclaimed). A model that does not fit in memory is therefore written as
``model-0000i-of-0000n.safetensors`` shards plus the ``model.safetensors.index.json`` that
transformers' ``save_pretrained`` also writes, with:

- ``ShardedWriter``: every tensor's name, dtype and shape is declared up front (a ``TensorPlan``),
  so each shard's header is written first and each tensor is appended as it is produced, then
  dropped; the files appear under their final names only when all are complete
  (``lowbit.io.output.staged_output`` is the caller's job: the writer writes into a directory).
- ``ShardedReader``: reads one tensor with ``os.pread`` into a fresh tensor, and advises the kernel
  to drop the file's pages it read (``POSIX_FADV_DONTNEED``), so the page cache stays small too.

The files are ordinary safetensors: transformers and ``safetensors.safe_open`` read them.
"""

from __future__ import annotations

import json
import os
import struct
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
           torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
           torch.float64: "F64"}
_FROM_NAME = {v: k for k, v in _DTYPES.items()}


@dataclass(frozen=True)
class TensorPlan:
    """A tensor to be written: its name, dtype and shape (known before its values are)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


def _shard_names(count: int) -> list[str]:
    """transformers' shard names (a single file keeps the plain name)."""
    if count == 1:
        return [SINGLE_NAME]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def _split(plans: Sequence[TensorPlan], max_shard_bytes: int) -> list[list[TensorPlan]]:
    """Consecutive runs of ``plans`` of at most ``max_shard_bytes`` each (a larger tensor alone)."""
    shards: list[list[TensorPlan]] = [[]]
    size = 0
    for plan in plans:
        if shards[-1] and size + plan.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(plan)
        size += plan.nbytes
    return shards


def _header(plans: Sequence[TensorPlan], metadata: dict[str, str] | None) -> bytes:
    """A safetensors header (length prefix included) for ``plans`` stored in this order, padded with
    spaces to a multiple of 8 bytes as the reference writer does."""
    entries: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for plan in plans:
        entries[plan.name] = {"dtype": _DTYPES[plan.dtype], "shape": list(plan.shape),
                              "data_offsets": [offset, offset + plan.nbytes]}
        offset += plan.nbytes
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_safetensors(path: str | Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` without its copy of every tensor's bytes: the header, then each
    tensor's memory as it is (a 400 MB activation buffer costs no second 400 MB)."""
    plans = [TensorPlan(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    with open(path, "wb") as f:
        f.write(_header(plans, metadata))
        for v in tensors.values():
            _write_tensor(f, v)


def _write_tensor(f, tensor: Tensor) -> None:
    data = tensor.detach().to("cpu").contiguous()
    if data.numel():
        f.write(memoryview(data.reshape(-1).view(torch.uint8).numpy()))


class ShardedWriter:
    """Write the tensors of ``plans``, in that order, into shards of at most ``max_shard_bytes``
    under ``directory`` (plus the index when there is more than one shard).

    Use as a context manager; ``write`` each planned tensor in plan order. Leaving the block without
    an exception checks every tensor was written; the caller publishes the directory atomically.

    Raises:
        ValueError: a tensor out of plan order, of another shape or dtype, or missing at the end.
    """

    def __init__(self, directory: str | Path, plans: Sequence[TensorPlan], *, max_shard_bytes: int = 2 << 30,
                 metadata: dict[str, str] | None = None) -> None:
        if len({p.name for p in plans}) != len(plans):
            raise ValueError("tensor names must be unique")
        self.directory = Path(directory)
        self._shards = _split(plans, max_shard_bytes)
        self._names = _shard_names(len(self._shards))
        self._metadata = metadata
        self._order = [(s, p) for s, shard in enumerate(self._shards) for p in shard]
        self._next = 0
        self._file = None
        self._open_shard = -1

    def __enter__(self) -> ShardedWriter:
        self.directory.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if exc_type is None:
            if self._next != len(self._order):
                raise ValueError(f"{len(self._order) - self._next} planned tensors were not written, "
                                 f"the first {self._order[self._next][1].name!r}")
            if len(self._shards) > 1:
                self._write_index()

    def write(self, name: str, tensor: Tensor) -> None:
        """Append ``tensor``, which must be the next planned one."""
        if self._next >= len(self._order):
            raise ValueError(f"tensor {name!r} was not planned")
        shard, plan = self._order[self._next]
        if name != plan.name:
            raise ValueError(f"expected tensor {plan.name!r} next, got {name!r}")
        if tuple(tensor.shape) != plan.shape or tensor.dtype != plan.dtype:
            raise ValueError(f"tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)}, "
                             f"planned as {plan.dtype} {plan.shape}")
        if shard != self._open_shard:
            if self._file is not None:
                self._file.close()
            self._file = open(self.directory / self._names[shard], "wb")
            self._file.write(_header(self._shards[shard], self._metadata))
            self._open_shard = shard
        _write_tensor(self._file, tensor)
        self._next += 1

    def _write_index(self) -> None:
        index = {"metadata": {"total_size": sum(p.nbytes for _, p in self._order)},
                 "weight_map": {p.name: self._names[s] for s, p in self._order}}
        (self.directory / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def weight_files(directory: Path) -> list[str]:
    """The safetensors files of a model directory: the shards its index names, or model.safetensors.

    Raises:
        FileNotFoundError: neither is there.
    """
    index = directory / INDEX_NAME
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    if (directory / SINGLE_NAME).is_file():
        return [SINGLE_NAME]
    raise FileNotFoundError(f"{directory} has neither {SINGLE_NAME} nor {INDEX_NAME}")


@dataclass(frozen=True)
class _Entry:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


class ShardedReader:
    """Tensors of a directory's ``model.safetensors`` or sharded ``model-*.safetensors`` (through the
    index), read one at a time without mapping the files.

    Raises (on construction):
        FileNotFoundError: no weights file in ``directory``.
        ValueError: a header that is not valid safetensors.
    """

    def __init__(self, directory: str | Path, *, files: Sequence[str | Path] | None = None) -> None:
        directory = Path(directory)
        if files is None:
            files = weight_files(directory)
        self._entries: dict[str, _Entry] = {}
        self.metadata: dict[str, str] = {}
        for name in files:
            self._read_header(directory / name)

    @staticmethod
    def file_metadata(path: str | Path) -> dict[str, str]:
        """The ``__metadata__`` of one safetensors file."""
        return ShardedReader(Path(path).parent, files=[Path(path).name]).metadata

    def _read_header(self, path: Path) -> None:
        with open(path, "rb") as f:
            head = f.read(8)
            length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            size = path.stat().st_size
            if length < 2 or 8 + length > size:
                raise ValueError(f"{path} is not a safetensors file (bad header length)")
            try:
                header = json.loads(f.read(length))
            except ValueError as e:
                raise ValueError(f"{path} is not a safetensors file ({e})") from e
        self.metadata.update(header.pop("__metadata__", None) or {})
        for name, info in header.items():
            start, end = info["data_offsets"]
            if info["dtype"] not in _FROM_NAME or 8 + length + end > size:
                raise ValueError(f"{path}: tensor {name!r} has an unknown dtype or lies past the file's end")
            self._entries[name] = _Entry(path, _FROM_NAME[info["dtype"]], tuple(info["shape"]),
                                         8 + length + start, end - start)

    def keys(self) -> list[str]:
        """Tensor names, sorted (as ``safe_open`` lists them)."""
        return sorted(self._entries)

    def dtype(self, name: str) -> torch.dtype:
        return self._entries[name].dtype

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name].shape

    def get(self, name: str) -> Tensor:
        """A fresh tensor (not a view of any mapping) holding ``name``'s values."""
        e = self._entries[name]
        out = torch.empty(e.shape, dtype=e.dtype)
        buffer = out.reshape(-1).view(torch.uint8).numpy() if out.numel() else None
        if buffer is not None:
            fd = os.open(e.file, os.O_RDONLY)
            try:
                done = 0
                view = memoryview(buffer)
                while done < e.nbytes:
                    n = os.preadv(fd, [view[done:]], e.start + done)
                    if n <= 0:
                        raise ValueError(f"{e.file} ends inside tensor {name!r}")
                    done += n
                if hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(fd, e.start, e.nbytes, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return out

    def map(self, name: str) -> Tensor:
        """``name``'s values as a read-only view of the file's pages (float32 only; other dtypes are
        read as ``get`` does): the kernel reads only the pages used and may drop them again under a
        memory limit, so an embedding of which a few rows are looked up costs those rows."""
        e = self._entries[name]
        if e.dtype != torch.float32 or e.nbytes == 0:
            return self.get(name)
        array = np.memmap(e.file, dtype=np.float32, mode="r", offset=e.start, shape=e.shape)
        with warnings.catch_warnings():  # read-only by design: nothing writes a float source weight
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(array)

    def items(self) -> Iterator[tuple[str, Tensor]]:
        """Every tensor, one at a time, in file order."""
        for name in sorted(self._entries, key=lambda n: (self._entries[n].file, self._entries[n].start)):
            yield name, self.get(name)

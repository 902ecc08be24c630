"""Calibration split across processes (``torchrun``), with output byte-identical to one process.

Floating-point sums depend on their order, so the order is fixed by the data, not by the number of
processes: the calibration windows are cut into ``count`` contiguous *slices*; each slice's
statistics are accumulated batch by batch as one process always did, and the slices' statistics
are folded left to right (``InputMoments.merge``). One process with ``--reduction-slices N`` computes
every slice itself, holding two copies of each statistic (the fold and the slice being filled);
``N`` ranks compute one slice each. Either way every rank ends with the same bytes.

Per block, each rank runs the block over its own slice only (activations: 1/N each), the ranks
exchange their slice statistics (``all_gather``: each statistic of the block, ``N`` times over), the
solves (one per shared input and scheme) are dealt round-robin and each result is broadcast from
the rank that computed it, so every rank then holds the whole quantized block; rank 0 alone
writes the output. gloo on CPU (NCCL on GPUs is the same calls).

A rank that stops (an error or a kill) makes the collective of the others fail; they then say in
one line which rank did not arrive (each rank records in the launcher's key-value store the step
it reached) instead of gloo's transport error. Ranks of different lowbit/torch/transformers
versions, or given different recipes or calibration, are refused at the start in one line.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


class RankFailure(RuntimeError):
    """Another rank stopped or disagrees; the message is one line naming it."""


@dataclass(frozen=True)
class Slices:
    """How the calibration windows are cut, and which slices this process computes."""

    count: int = 1
    rank: int = 0
    world: int = 1

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError(f"reduction slices must be >= 1, got {self.count}")
        if self.world > 1 and self.count != self.world:
            raise ValueError(f"{self.world} ranks need --reduction-slices {self.world} (one slice each), got {self.count}")

    def bounds(self, k: int, samples: int) -> tuple[int, int]:
        """Windows ``[start, end)`` of slice ``k`` of ``samples``."""
        return k * samples // self.count, (k + 1) * samples // self.count

    def mine(self) -> list[int]:
        """The slices this process computes, in fold order."""
        return [self.rank] if self.world > 1 else list(range(self.count))

    @property
    def distributed(self) -> bool:
        return self.world > 1


def launched() -> bool:
    """Whether this process was started by torchrun with more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(identity: dict[str, Any], *, timeout_s: float = 1800.0) -> Slices:
    """Join the process group torchrun describes (gloo on CPU, NCCL when CUDA is there) and check
    every rank runs the same versions on the same job ``identity`` (recipe, calibration, model).

    Raises:
        RankFailure: a rank with other versions or another job, one line naming it.
    """
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and os.environ.get("LOWBIT_DIST_BACKEND") == "nccl" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = {"versions": _versions(), "job": identity}
    everyone: list[Any] = [None] * world
    guarded("start", lambda: dist.all_gather_object(everyone, mine))
    for other, theirs in enumerate(everyone):
        if theirs["versions"] != mine["versions"]:
            raise RankFailure(f"rank {other} runs {_describe(theirs['versions'])}, rank {rank} "
                              f"{_describe(mine['versions'])}; install the same versions on every machine")
        if theirs["job"] != mine["job"]:
            raise RankFailure(f"rank {other} was given another job than rank {rank} (model, recipe or calibration "
                              "differ); pass the same arguments to every rank")
    return Slices(count=world, rank=rank, world=world)


def _versions() -> dict[str, str]:
    import transformers

    import lowbit

    return {"lowbit": getattr(lowbit, "__version__", "unknown"), "torch": torch.__version__,
            "transformers": transformers.__version__}


def _describe(versions: dict[str, str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in versions.items())


_step = {"n": 0}


def guarded(what: str, collective: Callable[[], T]) -> T:
    """Run ``collective`` (a call every rank makes); when it fails because a rank stopped, raise one
    line naming the rank(s) that did not reach this step."""
    _step["n"] += 1
    store = _store()
    rank = dist.get_rank()
    if store is not None:
        store.set(f"lowbit/step/{rank}", str(_step["n"]))
    try:
        return collective()
    except (RuntimeError, ValueError, OSError) as e:  # gloo: "Connection closed by peer", timeouts
        behind = _ranks_behind(store, _step["n"])
        who = f"rank {', '.join(map(str, behind))}" if behind else "another rank"
        raise RankFailure(f"{who} stopped before {what} (step {_step['n']}); rank {rank} stops too, writing nothing "
                          f"({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})") from None


def _store() -> Any:
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        return _get_default_store()
    except (RuntimeError, ImportError, ValueError):
        return None


def _ranks_behind(store: Any, step: int) -> list[int]:
    if store is None:
        return []
    behind = []
    for other in range(dist.get_world_size()):
        try:
            store.wait([f"lowbit/step/{other}"], timedelta(seconds=2))
            reached = int(store.get(f"lowbit/step/{other}"))
        except (RuntimeError, ValueError):
            reached = 0
        if reached < step:
            behind.append(other)
    return behind


def gather_tensors(tensors: Sequence[torch.Tensor], what: str) -> list[list[torch.Tensor]]:
    """Every rank's ``tensors`` (same shapes and dtypes on all ranks), in rank order: ``[rank][i]``."""
    world = dist.get_world_size()
    out: list[list[torch.Tensor]] = [[] for _ in range(world)]
    for t in tensors:
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(world)]
        guarded(what, lambda: dist.all_gather(parts, t))
        for r in range(world):
            out[r].append(parts[r])
    return out


def shared_solves(jobs: Sequence[Callable[[], T]], slices: Slices, what: str) -> Iterator[T]:
    """Run ``jobs`` (deterministic, the same list on every rank) dealt round-robin over the ranks and
    yield every result on every rank in job order, each broadcast from the rank that computed it.
    One process yields each result as soon as its job ends, so the caller can install it, and let go
    of the float weights it replaces, before the next job runs."""
    if not slices.distributed:
        for job in jobs:
            yield job()
        return
    own = {j: job() for j, job in enumerate(jobs) if j % slices.world == slices.rank}  # all ranks at once
    for j in range(len(jobs)):
        box = [own.pop(j, None)]
        guarded(what, lambda: dist.broadcast_object_list(box, src=j % slices.world))
        yield box[0]


def barrier(what: str) -> None:
    """Wait for every rank (before rank 0 publishes the output)."""
    guarded(what, dist.barrier)

"""Two gloo ranks on a tiny model give the bytes of one process; a rank that stops is named."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lowbit.api import load
from lowbit.pipeline import distributed
from lowbit.pipeline.recipe import Recipe, method_shorthand
from lowbit.pipeline.sequential import quantize_sequential
from lowbit.scheme import QuantScheme

RECIPE = replace(Recipe(default=QuantScheme(bits=4, group_size=64)), method=method_shorthand("gptq")[0],
                 method_config=None)


def _calib() -> torch.Tensor:
    return torch.randint(0, 300, (8, 96), generator=torch.Generator().manual_seed(1))


def _rank(rank: int, world: int, store: str, model_dir: str, out: str, scenario: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        identity = {"recipe": RECIPE.to_dict(), "job": "other" if scenario == "other job" and rank == 1 else "same"}
        slices = distributed.init(identity, timeout_s=60)
        model, _ = load(model_dir)
        if scenario == "rank dies" and rank == 1:
            os._exit(3)  # as a killed process: no goodbye
        quantize_sequential(model, RECIPE, _calib(), progress=False, slices=slices)
        if rank == 0:
            torch.save({k: v for k, v in model.state_dict().items()}, out)
    except distributed.RankFailure as e:
        with open(f"{out}.rank{rank}.err", "w") as f:
            f.write(str(e))


def _spawn(tmp_path, model_dir, scenario: str) -> str:
    """Both ranks as plain processes (``mp.spawn`` would kill the survivor as soon as one rank dies)."""
    out = str(tmp_path / "state.pt")
    ctx = mp.get_context("spawn")
    ranks = [ctx.Process(target=_rank, args=(r, 2, str(tmp_path / "store"), str(model_dir), out, scenario))
             for r in range(2)]
    for p in ranks:
        p.start()
    for p in ranks:
        p.join(300)
    return out


def test_two_ranks_equal_one_process_with_two_slices(tiny_llama_dir, tmp_path):
    out = _spawn(tmp_path, tiny_llama_dir, "same")
    two_ranks = torch.load(out, weights_only=True)
    model, _ = load(str(tiny_llama_dir))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank: float sums split over more threads round differently
    try:
        quantize_sequential(model, RECIPE, _calib(), progress=False, slices=distributed.Slices(2))
    finally:
        torch.set_num_threads(threads)
    one = model.state_dict()
    assert sorted(one) == sorted(two_ranks)
    assert all(torch.equal(one[k], two_ranks[k]) for k in one)
    plain, _ = load(str(tiny_llama_dir))  # the slice order matters: one slice rounds differently
    quantize_sequential(plain, RECIPE, _calib(), progress=False)
    assert not all(torch.equal(v, one[k]) for k, v in plain.state_dict().items())


def test_a_rank_that_dies_is_named_and_nothing_is_written(tiny_llama_dir, tmp_path):
    out = _spawn(tmp_path, tiny_llama_dir, "rank dies")
    assert not os.path.exists(out)
    message = open(f"{out}.rank0.err").read()
    assert "rank 1 stopped before" in message and "\n" not in message


def test_ranks_given_other_jobs_are_refused(tiny_llama_dir, tmp_path):
    out = _spawn(tmp_path, tiny_llama_dir, "other job")
    message = open(f"{out}.rank0.err").read()
    assert "rank 1 was given another job" in message

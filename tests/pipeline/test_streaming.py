"""Quantizing a model streamed from disk with a BlockStore equals quantizing it in memory, and resumes."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from lowbit.api import load
from lowbit.io.checkpoint import load_quantized, save_quantized
from lowbit.pipeline.block_store import BlockStore, fingerprint
from lowbit.pipeline.lazy_model import load_lazy
from lowbit.pipeline.recipe import Recipe, method_shorthand
from lowbit.pipeline.sequential import quantize_sequential
from lowbit.pipeline.streamed_save import save_streamed
from lowbit.scheme import QuantScheme


def _recipe(method: str) -> Recipe:
    name, transforms = method_shorthand(method)
    return replace(Recipe(default=QuantScheme(bits=4, group_size=64)), method=name, method_config=None, transforms=transforms)


@pytest.fixture(scope="module")
def calib(tiny_llama_dir):
    return torch.randint(0, 300, (8, 96), generator=torch.Generator().manual_seed(1))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_streamed_equals_in_memory(tiny_llama_dir, calib, tmp_path, method):
    recipe = _recipe(method)
    model, tok = load(str(tiny_llama_dir))
    quantize_sequential(model, recipe, calib, batch_size=4, progress=False)
    save_quantized(model, tmp_path / "memory", recipe=recipe)

    lazy = load_lazy(tiny_llama_dir)
    assert all(p.is_meta for p in lazy.parameters())
    store = BlockStore(tmp_path / "work", fingerprint(recipe.to_dict(), calib))
    quantize_sequential(lazy, recipe, calib, batch_size=4, progress=False, store=store)
    assert all(p.is_meta for p in lazy.model.layers.parameters())  # finished blocks left memory
    save_streamed(lazy, store, tmp_path / "streamed", recipe=recipe, tokenizer=tok, max_shard_bytes=1 << 20)
    assert (tmp_path / "streamed" / "model.safetensors.index.json").is_file()

    a, _ = load_quantized(tmp_path / "memory")
    b, _ = load_quantized(tmp_path / "streamed")
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(_logits(a, calib), _logits(b, calib))


def test_an_interrupted_job_resumes_to_the_same_checkpoint(tiny_llama_dir, calib, tmp_path, monkeypatch):
    recipe = _recipe("gptq")
    job = fingerprint(recipe.to_dict(), calib)
    whole = load_lazy(tiny_llama_dir)
    quantize_sequential(whole, recipe, calib, progress=False, store=BlockStore(tmp_path / "whole", job))

    save = BlockStore.save
    def stop_after_block_0(self, i, *args):
        save(self, i, *args)
        if i == 0:
            raise KeyboardInterrupt
    monkeypatch.setattr(BlockStore, "save", stop_after_block_0)
    with pytest.raises(KeyboardInterrupt):
        quantize_sequential(load_lazy(tiny_llama_dir), recipe, calib, progress=False,
                            store=BlockStore(tmp_path / "cut", job))
    monkeypatch.setattr(BlockStore, "save", save)
    assert BlockStore(tmp_path / "cut", job).done() == 1
    again = load_lazy(tiny_llama_dir)
    report = quantize_sequential(again, recipe, calib, progress=False, store=BlockStore(tmp_path / "cut", job))
    assert len(report.layers) == 14
    save_streamed(whole, BlockStore(tmp_path / "whole", job), tmp_path / "a", recipe=recipe)
    save_streamed(again, BlockStore(tmp_path / "cut", job), tmp_path / "b", recipe=recipe)
    ra, rb = load_quantized(tmp_path / "a")[0].state_dict(), load_quantized(tmp_path / "b")[0].state_dict()
    assert all(torch.equal(ra[k], rb[k]) for k in ra)
    with pytest.raises(ValueError, match="progress of another job"):
        BlockStore(tmp_path / "cut", fingerprint("another")).done()

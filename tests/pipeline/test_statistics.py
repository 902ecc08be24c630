"""The block-by-block input-statistics collector: its sharing rule, its records against the model's
own forward, and its memory bound (one block's records alive at a time)."""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

from lowbit.pipeline.architectures import architecture_for
from lowbit.pipeline.statistics import (
    InputMoments,
    capture_block_inputs,
    collect_block_statistics,
    stream_input_statistics,
)


@pytest.fixture(scope="module")
def tiny_llama(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


def _ids(samples: int, seqlen: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 500, (samples, seqlen), generator=torch.Generator().manual_seed(seed))


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear)


def _inputs_of_the_full_forward(model: nn.Module, ids: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """``[tokens, in]`` inputs of ``names`` in one forward of the whole model."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, args, n=n: seen.__setitem__(n, args[0].reshape(-1, args[0].shape[-1]))) for n in names]
    try:
        with torch.no_grad():
            model(ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return seen


def test_linears_reading_one_input_share_one_record(tiny_llama):
    arch = architecture_for(tiny_llama)
    ids = _ids(4, 32, 0)
    with torch.no_grad():
        hidden, block_args = capture_block_inputs(tiny_llama, arch.block_list(tiny_llama), ids, batch_size=2)
    block = arch.block_list(tiny_llama)[0]
    linears = [n for n, m in block.named_modules() if _is_linear(m)]
    stats = collect_block_statistics(block, linears, hidden, block_args[0], 2)
    assert [st.members for st in stats.sets] == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                                                 ["self_attn.o_proj"], ["mlp.gate_proj", "mlp.up_proj"],
                                                 ["mlp.down_proj"]]
    chunks = list(stream_input_statistics(tiny_llama, ids, _is_linear, new_record=lambda: InputMoments(True),
                                          batch_size=3, progress=False))
    assert len(chunks) == 3  # two blocks, then the untied lm_head outside them
    first = chunks[0]
    assert first["model.layers.0.self_attn.q_proj"] is first["model.layers.0.self_attn.v_proj"]
    assert first["model.layers.0.mlp.gate_proj"] is first["model.layers.0.mlp.up_proj"]
    assert len({id(r) for r in first.values()}) == 4


def test_records_are_those_of_the_models_own_forward(tiny_llama):
    """Each block runs on the previous block's outputs and the tail on the last block's: the records
    equal statistics of the inputs the whole model's forward feeds each linear."""
    ids = _ids(5, 32, 1)
    records = {name: r for chunk in stream_input_statistics(tiny_llama, ids, _is_linear, progress=False,
                                                            new_record=lambda: InputMoments(True), batch_size=2)
               for name, r in chunk.items()}
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj",
             "lm_head"]
    for name, x in _inputs_of_the_full_forward(tiny_llama, ids, names).items():
        r = records[name]
        assert r.n == len(x)
        torch.testing.assert_close(r.H, 2 * x.T @ x / len(x), rtol=1e-4, atol=1e-5 * r.H.abs().max().item())
        torch.testing.assert_close(r.sqmean, (x * x).mean(0), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(r.absmean, x.abs().mean(0), rtol=1e-4, atol=1e-6)


def test_at_most_one_blocks_records_are_alive(tiny_llama, live_records):
    """A consumer that drops each chunk before the next sees a new block's records built only after
    the previous block's are gone: at most one block's Hessians exist at any time."""
    sizes = []
    for chunk in stream_input_statistics(tiny_llama, _ids(2, 16, 2), _is_linear, new_record=live_records,
                                         progress=False):
        sizes.append(len({id(r) for r in chunk.values()}))
        del chunk
    assert sizes == [4, 4, 1] and live_records.peak == 4  # per block: q/k/v, o, gate/up, down; then lm_head
    gc.collect()
    assert not live_records.live


def test_a_refused_input_names_its_layer(tiny_llama):
    class Refuse:
        def update(self, x: torch.Tensor) -> None:
            raise ValueError("activations contain NaN/Inf")

    with pytest.raises(ValueError, match="model.layers.0.self_attn.q_proj: activations contain NaN/Inf"):
        next(stream_input_statistics(tiny_llama, _ids(1, 8, 0), _is_linear, new_record=Refuse, progress=False))


@pytest.mark.parametrize("calib", [torch.zeros(0, 8, dtype=torch.long), torch.zeros(8, dtype=torch.long),
                                   torch.zeros(2, 8)])
def test_stream_needs_token_windows(tiny_llama, calib):
    with pytest.raises(ValueError, match="int64 token ids"):
        next(stream_input_statistics(tiny_llama, calib, _is_linear, new_record=lambda: InputMoments(False)))

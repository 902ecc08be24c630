"""The decode loop behind ``lowbit generate`` and ``lowbit bench-speed``."""

import pytest
import torch

from lowbit.api import load, quantize
from lowbit.evaluate.generate import bench_speed, generate, set_threads
from lowbit.nn import prepare_kernels
from lowbit.pipeline.recipe import Recipe
from lowbit.scheme import QuantScheme


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    model, _ = load(str(tiny_llama_dir))
    return model.eval()


def _prompt(n=12, seed=0):
    return torch.randint(3, 500, (1, n), generator=torch.Generator().manual_seed(seed))


def test_greedy_equals_transformers_generate(tiny):
    ids = _prompt()
    ours = generate(tiny, ids, 10)
    theirs = tiny.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ours.tokens == theirs[0, ids.shape[1]:].tolist()
    assert len(ours.decode_seconds) == 9 and ours.prefill_seconds > 0


def test_quantized_model_on_its_kernels_decodes_like_the_reference_path(tiny_llama_dir):
    model, _ = load(str(tiny_llama_dir))
    quantize(model, Recipe(default=QuantScheme(bits=8, granularity="channel")), progress=False)
    ids = _prompt(seed=1)
    reference = generate(model, ids, 12).tokens
    chosen = prepare_kernels(model)
    assert "reference" not in chosen
    assert generate(model, ids, 12).tokens == reference


def test_sampling_is_seeded_and_eos_stops(tiny):
    ids = _prompt(seed=2)
    a = generate(tiny, ids, 8, temperature=1.0, seed=5).tokens
    assert a == generate(tiny, ids, 8, temperature=1.0, seed=5).tokens
    first = generate(tiny, ids, 8).tokens[0]
    assert generate(tiny, ids, 8, eos_token_id=first).tokens == [first]


def test_bad_input_is_one_line(tiny):
    with pytest.raises(ValueError, match="one non-empty prompt"):
        generate(tiny, torch.zeros(1, 0, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        generate(tiny, _prompt(), 0)
    with pytest.raises(ValueError, match="thread count must be an integer >= 1"):
        set_threads(0)


def test_bench_speed_reports_both_phases(tiny):
    report = bench_speed(tiny, prompt_tokens=16, new_tokens=4, repeats=1)
    assert report["prefill_tokens_per_second"] > 0 and report["decode_tokens_per_second"] > 0
    assert report["threads"] == torch.get_num_threads() and report["peak_rss_mib"] > 0

"""The Fisher collector against autograd on each window, and how the pipeline refuses what it cannot do."""

from __future__ import annotations

import pytest
import torch

from lowbit.api import load, quantize
from lowbit.pipeline.fisher import collect_fisher
from lowbit.pipeline.recipe import Recipe
from lowbit.scheme import QuantScheme

LUT4 = QuantScheme(format="lut", bits=4, granularity="channel")


def _windows(vocab: int, n: int = 3, seqlen: int = 32) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(0))


def test_fisher_is_the_mean_squared_gradient_of_each_windows_loss(tiny_llama_dir):
    model, _ = load(str(tiny_llama_dir))
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    calib = _windows(model.config.vocab_size)
    flags = [p.requires_grad for p in model.parameters()]
    result = collect_fisher(model, calib, names, progress=False)
    assert result.windows == 3 and set(result.fisher) == set(names)
    assert [p.requires_grad for p in model.parameters()] == flags and all(p.grad is None for p in model.parameters())
    weights = [model.get_submodule(n).weight for n in names]
    expected = [torch.zeros_like(w) for w in weights]
    for window in calib:
        loss = model(input_ids=window[None], labels=window[None], use_cache=False).loss
        for e, g in zip(expected, torch.autograd.grad(loss, weights)):
            e += g * g / calib.shape[0]
    for name, e in zip(names, expected):
        torch.testing.assert_close(result.fisher[name], e, rtol=1e-4, atol=1e-12)


def test_bad_windows_are_refused(tiny_llama_dir):
    model, _ = load(str(tiny_llama_dir))
    with pytest.raises(ValueError, match="int64 token ids"):
        collect_fisher(model, torch.zeros(2, 1, dtype=torch.long), ["model.layers.0.mlp.up_proj"], progress=False)


def test_squeezellm_without_calibration_data_is_refused(tiny_llama_dir):
    model, _ = load(str(tiny_llama_dir))
    with pytest.raises(ValueError, match="needs calibration data"):
        quantize(model, Recipe(method="squeezellm", default=LUT4), progress=False)


def test_squeezellm_after_a_channel_scaling_is_refused(tiny_llama_dir):
    model, _ = load(str(tiny_llama_dir))
    with pytest.raises(ValueError, match="does not compose with awq"):
        quantize(model, Recipe(method="squeezellm", transforms=("awq",), default=LUT4),
                 calibration=_windows(model.config.vocab_size, 8, 64), progress=False)

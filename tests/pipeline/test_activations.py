"""W8A8 through the pipeline: dynamic and static activation scales, SmoothQuant, save/load, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lowbit.act_scheme import ActScheme
from lowbit.api import quantize
from lowbit.io.checkpoint import load_quantized, save_quantized
from lowbit.methods.rtn import quantize_rtn
from lowbit.nn import QuantLinear, quantized_layers
from lowbit.nn.act_linear import ActQuantLinear
from lowbit.pipeline.activations import quantize_activations
from lowbit.pipeline.recipe import Recipe

INT8_PC = ActScheme().weight_scheme()


def _ids(samples: int, seqlen: int, seed: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (samples, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny_llama(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


def _rel_err(model: nn.Module, ref: nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        a, b = model(ids).logits, ref(ids).logits
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("act", [
    ActScheme(),
    ActScheme(format="fp8_e4m3"),
    *[ActScheme(dynamic=False, granularity="tensor", observer=o) for o in ("minmax", "percentile", "mse", "kl")],
])
def test_w8a8_runs_every_linear_in_8_bits_and_stays_close(tiny_llama, act):
    model = copy.deepcopy(tiny_llama)
    calib = _ids(4, 32, seed=0, vocab=model.config.vocab_size)
    recipe = Recipe(default=act.weight_scheme(), activations=act)
    report = quantize(model, recipe, calibration=calib, progress=False)
    layers = quantized_layers(model)
    assert len(layers) == 14 and all(isinstance(m, ActQuantLinear) for m in layers.values())
    if act.dynamic:
        assert report.activations.input_scales == {}
    else:
        assert set(report.activations.input_scales) == set(layers)
        assert all(s > 0 for s in report.activations.input_scales.values())
    bound = 0.05 if act.format.value == "int8" else 0.12  # E4M3 keeps 3 mantissa bits: ~4% per value
    assert _rel_err(model, tiny_llama, _ids(2, 32, seed=1, vocab=model.config.vocab_size)) < bound


def test_static_scales_survive_save_and_load(tiny_llama, tmp_path):
    model = copy.deepcopy(tiny_llama)
    act = ActScheme(dynamic=False, granularity="tensor", observer="percentile", percentile=99.9)
    recipe = Recipe(default=INT8_PC, activations=act)
    report = quantize(model, recipe, calibration=_ids(4, 32, 0, model.config.vocab_size), progress=False)
    save_quantized(model, tmp_path / "w8a8", recipe=recipe)
    loaded, _ = load_quantized(tmp_path / "w8a8")
    for name, m in quantized_layers(loaded).items():
        assert isinstance(m, ActQuantLinear) and m.act == act
        assert float(m.input_scale) == pytest.approx(report.activations.input_scales[name], rel=1e-6)
    ids = _ids(2, 16, 3, model.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("method", ["smoothquant", "smoothquant+gptq"])
def test_smoothquant_then_static_w8a8(tiny_llama, method):
    """SmoothQuant's folds are exact (tested in test_sequential); here it runs end to end, alone
    (then RTN) and composed with GPTQ for the weights."""
    model = copy.deepcopy(tiny_llama)
    act = ActScheme(dynamic=False, granularity="tensor")
    name = "gptq" if method.endswith("gptq") else "rtn"
    report = quantize(model, Recipe(method=name, transforms=("smoothquant",), default=INT8_PC, activations=act),
                      calibration=_ids(16, 64, 0, model.config.vocab_size), progress=False)
    assert report.method == method and set(report.method_of.values()) == {name}
    # per block: input norm, post-attention norm, up -> down (GQA: no v -> o)
    assert [d["smoothquant"]["folded"] for d in report.details.values()] == [True] * 2 * 3
    assert _rel_err(model, tiny_llama, _ids(2, 32, 1, model.config.vocab_size)) < 0.05


def _weight_quantized(tiny_llama, embed_scale: float = 1.0) -> nn.Module:
    """``tiny_llama`` with int8 per-channel weights and one more ``QuantLinear`` (``unused``) that its
    forward never calls; the embedding scaled by ``embed_scale``."""
    model = copy.deepcopy(tiny_llama)
    quantize(model, Recipe(default=INT8_PC), progress=False)
    model.model.embed_tokens.weight.data.mul_(embed_scale)
    w = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
    model.model.layers[1].unused = QuantLinear.from_quantized(quantize_rtn(w, INT8_PC))
    return model


def test_static_activation_bad_input(tiny_llama):
    act = ActScheme(dynamic=False, granularity="tensor")
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="needs calibration data"):
        quantize_activations(_weight_quantized(tiny_llama), act, None)
    with pytest.raises(ValueError, match="never reached model.layers.1.unused"):
        quantize_activations(_weight_quantized(tiny_llama), act, ids)
    with pytest.raises(ValueError, match="model.layers.0.self_attn.q_proj: activations contain NaN/Inf"):
        quantize_activations(_weight_quantized(tiny_llama, float("inf")), act, ids)
    with pytest.raises(ValueError, match="needs calibration data"):
        quantize(copy.deepcopy(tiny_llama), Recipe(default=INT8_PC, activations=act), calibration=None)


def test_recipe_scheme_the_product_cannot_take_fails_before_any_work(tiny_llama):
    model = copy.deepcopy(tiny_llama)
    with pytest.raises(ValueError, match="int8 activations need int8 per-channel weights"):
        quantize(model, Recipe(activations=ActScheme()), progress=False)
    assert not quantized_layers(model)


def test_outlier_ratio_sends_only_the_outlier_layer_to_dynamic_scales(tiny_llama):
    from lowbit.pipeline.activations import record_activation_histograms

    model = copy.deepcopy(tiny_llama)
    quantize(model, Recipe(default=INT8_PC), progress=False)
    calib = _ids(4, 32, 0, model.config.vocab_size)
    histograms = record_activation_histograms(model, calib, progress=False)
    sink = "model.layers.1.mlp.down_proj"
    typical = histograms[sink].token_max.quantile(0.5)
    histograms[sink].update(torch.full((1, 512), 1000.0 * typical))  # one huge token, like an attention sink
    act = ActScheme(dynamic=False, granularity="tensor", observer="minmax", outlier_ratio=64)
    report = quantize_activations(model, act, histograms=histograms, progress=False)
    assert list(report.dynamic_layers) == [sink] and report.dynamic_layers[sink] > 900
    layers = quantized_layers(model)
    assert layers[sink].act == ActScheme() and sink not in report.input_scales
    assert all(m.act == act for n, m in layers.items() if n != sink)


def test_outlier_ratio_validation_and_record():
    with pytest.raises(ValueError, match="applies to static scales"):
        ActScheme(outlier_ratio=8)
    with pytest.raises(ValueError, match="must be above 1"):
        ActScheme(dynamic=False, granularity="tensor", outlier_ratio=1.0)
    act = ActScheme(dynamic=False, granularity="tensor", outlier_ratio=8)
    assert ActScheme.from_dict(act.to_dict()) == act and "dynamic above 8x" in act.describe()
    assert "outlier_ratio" not in ActScheme(dynamic=False, granularity="tensor").to_dict()

"""Every entry of the method and transform tables: well formed, no worse than RTN where it reads
statistics, and through quantize -> save -> load on a tiny model."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from lowbit.api import load, quantize
from lowbit.io.checkpoint import load_quantized, save_quantized
from lowbit.methods import METHODS, TRANSFORMS, Statistic, get_method
from lowbit.nn import quantized_layers
from lowbit.pipeline.recipe import Recipe
from lowbit.scheme import QuantScheme

# Methods on a scalar grid from one layer's input statistics (squeezellm's Fisher needs the whole
# model, and it fills lookup tables: tests/methods/test_squeezellm.py compares it with RTN; vq and pq
# fill codebooks: tests/methods/test_vq.py).
OWN_SCHEMES = {
    "squeezellm": QuantScheme(format="lut", bits=4, granularity="channel"),
    "vq": QuantScheme(format="vq", bits=4, vector_dim=1, granularity="tensor"),
    "pq": QuantScheme(format="vq", bits=4, vector_dim=1, granularity="group", group_size=128, shared_codebook=True),
}
CALIBRATED = [name for name, m in METHODS.items()
              if m.calibrated and Statistic.FISHER not in m.statistics and name not in OWN_SCHEMES]


@pytest.mark.parametrize("entry", [*METHODS.values(), *TRANSFORMS.values()], ids=lambda e: e.name)
def test_entries_are_well_formed(entry):
    config = entry.default_config()
    assert dataclasses.is_dataclass(config) and entry.config.__dataclass_params__.frozen
    assert all(isinstance(s, Statistic) for s in entry.statistics) and entry.summary
    if dataclasses.fields(config):  # a bad value is refused with one line naming the field
        field = dataclasses.fields(config)[0]
        with pytest.raises((ValueError, TypeError)):
            dataclasses.replace(config, **{field.name: -1 if field.type != "bool" else "x"})


@pytest.fixture(scope="module")
def real_layer():
    """SmolLM2-135M's layers.1.self_attn.q_proj weight [576, 576] and statistics of its input over 8
    windows of 128 tokens of WikiText-2 valid (1024 tokens: more than its 576 inputs)."""
    from lowbit.pipeline.calibration import calibration_windows
    from lowbit.sources import pull

    model, tokenizer = load(str(pull("smollm2-135m", progress=False)))
    layer = model.model.layers[1].self_attn.q_proj
    inputs = []

    class Stop(Exception):
        pass

    def keep(module, args):
        inputs.append(args[0].reshape(-1, args[0].shape[-1]).float())
        raise Stop

    handle = layer.register_forward_pre_hook(keep)
    try:
        with torch.no_grad():
            for window in calibration_windows(tokenizer, samples=8, seqlen=128, seed=0):
                try:
                    model(window[None], use_cache=False)
                except Stop:
                    pass
    finally:
        handle.remove()
    x = torch.cat(inputs)
    stats = {"hessian": 2 * x.T @ x / x.shape[0], "absmean": x.abs().mean(0), "absmax": x.abs().amax(0)}
    return layer.weight.detach().float().clone(), stats


@pytest.mark.real_model
@pytest.mark.parametrize("scheme", [QuantScheme(bits=4, group_size=64, symmetric=False),
                                    QuantScheme(bits=3, group_size=64, symmetric=False),
                                    QuantScheme(bits=4, granularity="channel")], ids=lambda s: s.describe())
@pytest.mark.parametrize("name", CALIBRATED)
def test_calibrated_method_output_error_no_worse_than_rtn(real_layer, name, scheme):
    """``tr(dW H dW^T)``, the layer's squared output error on the calibration tokens."""
    W, stats = real_layer
    method = get_method(name)

    def error(qw) -> float:
        dW = qw.dequantize().float() - W
        return float(((dW @ stats["hessian"]) * dW).sum())

    rtn = error(get_method("rtn").quantize(W, scheme))
    ours = error(method.solve([W], scheme, method.default_config(), stats, ["q_proj"])[0])
    assert ours <= rtn, (name, ours, rtn)


def _calibration(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (8, 64), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method, transforms", [*((m, ()) for m in METHODS),
                                                *(("rtn", (t,)) for t in TRANSFORMS)],
                         ids=lambda v: v if isinstance(v, str) else "+".join(v) or "-")
def test_every_method_and_transform_round_trips_through_a_checkpoint(tiny_llama_dir, tmp_path, method, transforms):
    model, _ = load(str(tiny_llama_dir))
    recipe = Recipe(method=method, transforms=transforms,
                    default=OWN_SCHEMES.get(method, QuantScheme(bits=4, group_size=64, symmetric=False)))
    calib = _calibration(model.config.vocab_size)
    ids = calib[:2, :16]
    with torch.no_grad():
        ref = model(ids).logits
    report = quantize(model, recipe, calibration=calib, progress=False)
    assert report.method == recipe.describe_method() and set(report.method_of.values()) == {method}
    save_quantized(model, tmp_path / "q", recipe=recipe)
    loaded, _ = load_quantized(tmp_path / "q")
    with torch.no_grad():
        out = model(ids).logits
        assert torch.equal(loaded(ids).logits, out)
    assert (out - ref).norm() < 0.5 * ref.norm()
    assert quantized_layers(loaded).keys() == quantized_layers(model).keys()
    saved = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["recipe"]
    assert Recipe.from_dict(saved) == recipe


def test_method_knobs_travel_in_the_recipe(tiny_llama_dir, monkeypatch):
    """The config in the recipe is the one every ``solve`` call gets."""
    from lowbit.methods.gptq import GPTQConfig

    seen = []
    gptq = METHODS["gptq"]
    monkeypatch.setitem(METHODS, "gptq", dataclasses.replace(
        gptq, solve=lambda weights, scheme, config, *rest: seen.append(config) or gptq.solve(weights, scheme, config,
                                                                                             *rest)))
    config = GPTQConfig(damp=0.05, act_order=False)
    model, _ = load(str(tiny_llama_dir))
    quantize(model, Recipe(method="gptq", method_config=config), calibration=_calibration(model.config.vocab_size),
             progress=False)
    assert len(seen) == 2 * 4 and all(c is config for c in seen)  # per block: q/k/v, o, gate/up, down


def test_a_method_that_declares_the_fisher_gets_each_linears_own(tiny_llama_dir, monkeypatch):
    """The rows of ``statistics["fisher"]`` are the Fisher of the weights ``solve`` gets, stacked in order."""
    from lowbit.pipeline.fisher import collect_fisher

    seen = {}

    def solve(weights, scheme, config, statistics, layers):
        seen.update(zip(layers, statistics["fisher"].split([w.shape[0] for w in weights])))
        return METHODS["gptq"].solve(weights, scheme, METHODS["gptq"].default_config(), statistics, layers)

    entry = dataclasses.replace(METHODS["gptq"], name="fisher_gptq", solve=solve,
                                statistics=frozenset({Statistic.FISHER, Statistic.HESSIAN}))
    monkeypatch.setitem(METHODS, "fisher_gptq", entry)
    model, _ = load(str(tiny_llama_dir))
    calib = _calibration(512)
    expected = collect_fisher(model, calib, [n for n, m in model.named_modules()
                                             if isinstance(m, torch.nn.Linear) and n != "lm_head"], progress=False)
    report = quantize(model, Recipe(method="fisher_gptq", default=QuantScheme(bits=4, group_size=64)),
                      calibration=calib, progress=False)
    assert seen.keys() == expected.fisher.keys() and len(seen) == 14 and report.fisher_windows == 8
    for name, f in seen.items():
        assert torch.equal(f, expected.fisher[name]), name

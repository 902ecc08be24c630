"""A method per layer in recipes, and the held-out choice between methods (lowbit.pipeline.holdout)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from lowbit.api import quantize
from lowbit.methods import get_method
from lowbit.methods.gptq import GPTQConfig, accumulate_hessian
from lowbit.nn.replace import quantized_layers
from lowbit.pipeline.holdout import HoldOut, MethodChoice, choose_on_heldout, is_held_out, output_error
from lowbit.pipeline.recipe import Override, Recipe, pinned_recipe
from lowbit.scheme import QuantScheme

INT3 = QuantScheme(bits=3, group_size=64, symmetric=False)


@pytest.fixture(scope="module")
def tiny_llama(tiny_llama_dir: Path) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def calib(tiny_llama) -> torch.Tensor:
    return torch.randint(0, tiny_llama.config.vocab_size, (8, 128), generator=torch.Generator().manual_seed(1))


def _codes(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: layer.quantized_weight().dequantize() for n, layer in quantized_layers(model).items()}


def test_recipe_with_per_override_methods_round_trips(tmp_path):
    recipe = Recipe(method="gptq", default=INT3, overrides=(
        Override("k_proj", INT3, "rtn"),
        Override("down_proj", QuantScheme(bits=4, group_size=64), "gptq", GPTQConfig(damp=0.1)),
        Override("o_proj", None)),
        holdout=HoldOut(3, (MethodChoice("rtn"), MethodChoice("gptq", GPTQConfig(damp=1.0)))))
    path = tmp_path / "r.json"
    path.write_text(recipe.dumps())
    again = Recipe.load(path)
    assert again == recipe
    assert again.method_for("model.layers.0.self_attn.k_proj") == MethodChoice("rtn")
    assert again.method_for("model.layers.0.mlp.down_proj").config.damp == 0.1
    assert again.method_for("model.layers.0.mlp.up_proj") == MethodChoice("gptq")
    assert [c.label for c in again.holdout.candidates] == ["rtn", "gptq(damp=1.0)"]
    # a recipe without the new keys writes exactly what it wrote before
    assert set(Recipe().to_dict()) == {"version", "method", "method_config", "transforms", "default", "overrides",
                                       "skip", "group_fallback", "activations"}


@pytest.mark.parametrize("bad, message", [
    ({"pattern": "k_proj", "scheme": None, "method": "nope"}, "unknown method 'nope'"),
    ({"pattern": "k_proj", "scheme": None, "method": "smoothquant"}, "is a shorthand"),
    ({"pattern": "k_proj", "scheme": None, "method_config": {"damp": 0.1}}, "but no method"),
    ({"pattern": "k_proj", "scheme": None, "method": "gptq", "method_config": {"dampp": 1}}, "unknown gptq config"),
])
def test_bad_override_methods_are_one_line(bad, message):
    with pytest.raises(ValueError, match=message) as e:
        Recipe.from_dict({"method": "rtn", "overrides": [bad]})
    assert "\n" not in str(e.value)


def test_a_fisher_method_per_layer_does_not_go_with_channel_scaling():
    with pytest.raises(ValueError, match="does not compose with awq"):
        Recipe.from_dict({"method": "gptq", "transforms": ["awq"],
                          "overrides": [{"pattern": "k_proj", "scheme": None, "method": "squeezellm"}]})


def test_a_recipe_mixing_rtn_and_gptq_gives_each_layer_what_its_method_alone_gives(tiny_llama, calib):
    mixed = Recipe(method="gptq", default=INT3, overrides=(Override(r"mlp\.(up|down)_proj|self_attn\.k_proj", INT3,
                                                                    "rtn"),))
    model = copy.deepcopy(tiny_llama)
    report = quantize(model, mixed, calibration=calib, progress=False)
    gptq_alone, rtn_alone = copy.deepcopy(tiny_llama), copy.deepcopy(tiny_llama)
    quantize(gptq_alone, Recipe(method="gptq", default=INT3), calibration=calib, progress=False)
    quantize(rtn_alone, Recipe(method="rtn", default=INT3), progress=False)
    got, g, r = _codes(model), _codes(gptq_alone), _codes(rtn_alone)
    for name, w in got.items():
        # block 0 sees the same inputs in all three runs; later blocks see the mixed model's outputs
        rtn = "up_proj" in name or "down_proj" in name or "k_proj" in name
        assert report.method_of[name] == ("rtn" if rtn else "gptq")
        if rtn:
            assert torch.equal(w, r[name])
        elif ".layers.0." in name:
            assert torch.equal(w, g[name])
    # a data-free recipe with a gptq override collects statistics for that layer only
    one = Recipe(method="rtn", default=INT3, overrides=(Override("self_attn.q_proj", INT3, "gptq"),))
    model = copy.deepcopy(tiny_llama)
    report = quantize(model, one, calibration=calib, progress=False)
    assert {n for n, m in report.method_of.items() if m == "gptq"} == {f"model.layers.{i}.self_attn.q_proj"
                                                                      for i in range(2)}
    assert torch.equal(_codes(model)["model.layers.0.self_attn.v_proj"], r["model.layers.0.self_attn.v_proj"])


def test_the_choice_never_keeps_a_candidate_with_larger_heldout_error():
    torch.manual_seed(0)
    n = 256
    W = torch.randn(64, n)
    # fitting inputs excite the first half of the columns, held-out inputs the second half: GPTQ fitted
    # on the first pushes its errors onto columns the held-out inputs read, so RTN must win there
    x_fit = torch.randn(512, n) * torch.cat([torch.full((n // 2,), 3.0), torch.full((n // 2,), 0.05)])
    x_held = torch.randn(512, n) * torch.cat([torch.full((n // 2,), 0.05), torch.full((n // 2,), 3.0)])
    H_fit, _ = accumulate_hessian(None, x_fit, 0)
    H_held, _ = accumulate_hessian(None, x_held, 0)
    scheme = QuantScheme(bits=3, group_size=64)
    candidates = [MethodChoice("gptq"), MethodChoice("rtn"), MethodChoice("gptq", GPTQConfig(damp=1.0))]
    results = {}

    def solve(k: int):
        c = candidates[k]
        results[k] = get_method(c.method).solve([W], scheme, c.config, {"hessian": H_fit}, ["w"])
        return results[k]

    [choice] = choose_on_heldout([W], H_held, [c.label for c in candidates], solve)
    errors = [output_error(W, results[k][0], H_held) for k in range(3)]
    assert choice.index == min(range(3), key=errors.__getitem__)
    assert choice.index != 0  # plain GPTQ overfits the fitting inputs here
    assert choice.errors == dict(zip([c.label for c in candidates], errors))
    assert torch.equal(choice.qweight.dequantize(), results[choice.index][0].dequantize())
    # judged on the inputs it was fitted to, GPTQ wins
    assert output_error(W, results[0][0], H_fit) < output_error(W, results[1][0], H_fit)


def test_heldout_choice_through_the_pipeline_is_recorded_and_deterministic(tiny_llama, calib):
    recipe = Recipe(method="gptq", default=INT3, holdout=HoldOut(4, (MethodChoice("rtn"),)))
    runs = []
    for _ in range(2):
        model = copy.deepcopy(tiny_llama)
        runs.append((model, quantize(model, recipe, calibration=calib, progress=False)))
    (a, report), (b, _) = runs
    assert all(torch.equal(x, y) for x, y in zip(_codes(a).values(), _codes(b).values()))
    assert set(report.chosen) == set(report.layers)
    for name, choice in report.chosen.items():
        errors = report.details[name]["holdout"]["heldout_errors"]
        assert set(errors) == {"gptq", "rtn"}
        assert errors[choice.label] == min(errors.values())
        assert report.method_of[name] == choice.method
    # the stored recipe pins every choice and makes the same weights again
    pinned = pinned_recipe(recipe, report.chosen, report.layers)
    again = copy.deepcopy(tiny_llama)
    quantize(again, Recipe.from_dict(pinned.to_dict()), calibration=calib, progress=False)
    assert all(torch.equal(x, y) for x, y in zip(_codes(a).values(), _codes(again).values()))


def test_windows_held_out_and_bad_holdouts():
    assert [w for w in range(12) if is_held_out(w, 4)] == [3, 7, 11]
    with pytest.raises(ValueError, match="every must be an int >= 2"):
        HoldOut(1)
    with pytest.raises(ValueError, match="METHOD:KEY=VALUE"):
        MethodChoice.parse("gptq:damp")
    assert MethodChoice.parse("gptq:damp=0.1").config.damp == 0.1


def test_quantize_holdout_from_the_command_line_pins_the_choices(tiny_llama_dir, tmp_path, capsys):
    from lowbit.cli import main

    calib = tmp_path / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_llama_dir), "-o", str(out), "--method", "gptq", "--bits", "3", "--group-size",
                 "64", "--asym", "--holdout", "2", "--holdout-candidates", "rtn,gptq:damp=1", "--calib", str(calib),
                 "--calib-samples", "8", "--calib-seqlen", "128", "--quiet"]) == 0
    assert "held-out choice: " in capsys.readouterr().out
    assert main(["info", str(out)]) == 0
    shown = capsys.readouterr().out
    layers = [line for line in shown.splitlines() if line.startswith("model.layers.")]
    assert len(layers) == 14 and all(" method " in line for line in layers)
    assert main(["quantize", str(tiny_llama_dir), "-o", str(tmp_path / "x"), "--method", "gptq", "--holdout", "4",
                 "--holdout-candidates", "gptq:damp", "--quiet"]) == 2
    assert "METHOD:KEY=VALUE" in capsys.readouterr().err

"""Recipes as plain data: method, config and transforms; what earlier lowbit wrote still reads."""

from __future__ import annotations

import pytest

from lowbit.methods.gptq import GPTQConfig
from lowbit.methods.hqq import HQQConfig
from lowbit.methods.smoothquant import SmoothQuantConfig
from lowbit.pipeline.recipe import Recipe, TransformStep, method_shorthand, method_shorthands


@pytest.mark.parametrize("written, method, transforms", [
    ({"version": 1, "method": "rtn"}, "rtn", ()),
    ({"version": 1, "method": "gptq"}, "gptq", ()),
    ({"version": 1, "method": "awq"}, "awq", ("awq",)),
    ({"version": 1, "method": "awq+gptq"}, "gptq", ("awq",)),
    ({"version": 1, "method": "awq+hqq"}, "hqq", ("awq",)),
    ({"version": 1, "method": "smoothquant"}, "rtn", ("smoothquant",)),
    ({"version": 1, "method": "smoothquant+gptq"}, "gptq", ("smoothquant",)),
    ({"version": 1, "method": "gptq", "rotation": "hadamard"}, "gptq", ("hadamard",)),
    ({"method": "awq+gptq"}, "gptq", ("awq",)),  # hand-written, no version
])
def test_recipes_written_before_the_tables_read_to_the_same_meaning(written, method, transforms):
    recipe = Recipe.from_dict(written)
    assert recipe.method == method and tuple(t.name for t in recipe.transforms) == transforms
    assert recipe.method_config == recipe.method_config.__class__()  # the defaults those recipes ran with
    assert recipe.describe_method() == written["method"] or "rotation" in written
    assert Recipe.from_dict(recipe.to_dict()) == recipe


def test_configs_are_plain_data_and_round_trip():
    recipe = Recipe(method="hqq", method_config=HQQConfig(iters=5),
                    transforms=(TransformStep("smoothquant", SmoothQuantConfig(alpha=0.8)),))
    d = recipe.to_dict()
    assert d["method_config"]["iters"] == 5 and d["transforms"] == [{"name": "smoothquant", "config": {"alpha": 0.8}}]
    assert Recipe.from_dict(d) == recipe
    # a transforms list is read literally: method awq without the awq scales
    assert Recipe.from_dict({"method": "awq", "transforms": []}).transforms == ()
    assert Recipe.from_dict({"method": "gptq", "transforms": ["smoothquant"]}).transforms[0].config == SmoothQuantConfig()


@pytest.mark.parametrize("bad, message", [
    ({"method": "xyz"}, "unknown method 'xyz'; valid: rtn, hqq, gptq, awq, .*smoothquant, awq\\+rtn"),
    ({"method": "gptq", "transforms": ["xyz"]}, "unknown transform 'xyz'"),
    ({"method": "gptq", "method_config": {"dampp": 0.1}}, r"unknown gptq config keys \['dampp'\]; valid: act_order"),
    ({"method": "gptq", "method_config": {"damp": -1}}, "damp must be > 0"),
    ({"method": "gptq", "transforms": ["hadamard", "awq"]}, "hadamard does not compose with 'awq'"),
    ({"method": "gptq", "transforms": ["awq", "awq"]}, "listed twice"),
    ({"method": "gptq", "rotation": "random"}, "unknown rotation 'random'"),
])
def test_bad_recipes_are_refused_in_one_line(bad, message):
    with pytest.raises(ValueError, match=message):
        Recipe.from_dict(bad)


def test_a_config_of_the_wrong_method_is_refused():
    with pytest.raises(ValueError, match="'rtn' takes a RTNConfig, got GPTQConfig"):
        Recipe(method="rtn", method_config=GPTQConfig())


def test_shorthands_come_from_the_tables():
    names = method_shorthands()
    assert {"rtn", "hqq", "gptq", "awq", "smoothquant", "awq+gptq", "smoothquant+gptq", "awq+hqq"} <= set(names)
    assert "hadamard+gptq" not in names  # a rotation is no channel scaling: --rotate / --transform
    assert method_shorthand("smoothquant+gptq") == ("gptq", ("smoothquant",))


def test_a_shorthand_in_the_constructor_says_how_to_spell_it():
    with pytest.raises(ValueError, match=r"method 'awq\+gptq' is a shorthand: write method='gptq', "
                                         r"transforms=\('awq',\)"):
        Recipe(method="awq+gptq")

import pytest

from lowbit.pipeline.recipe import Override, Recipe
from lowbit.scheme import QuantScheme


def test_round_trip_through_dict():
    s = QuantScheme(format="int", bits=3, granularity="group", group_size=32, symmetric=False, zero_point="float",
                    observer="mse")
    assert QuantScheme.from_dict(s.to_dict()) == s
    assert s.describe() == "int3 g32 asym-fmin"
    assert QuantScheme(format="nf4", double_quant=True).describe() == "nf4 g64 dq"


@pytest.mark.parametrize("kwargs,message", [
    (dict(format="nf4", bits=3), "nf4 is a 4-bit format"),
    (dict(format="fp8_e4m3", bits=4), "use --bits 8"),
    (dict(format="fp4", symmetric=False), "asymmetric is int only"),
    (dict(bits=9), "2 to 8 bits"),
    (dict(group_size=0), "positive group size"),
    (dict(observer="entropy"), "valid observers: minmax, percentile, mse, kl"),
    (dict(granularity="row"), "valid: tensor, channel, group"),
])
def test_bad_combinations(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantScheme(**kwargs)


def test_recipe_patterns_first_match_wins_and_skip(tmp_path):
    eight = QuantScheme(bits=8, granularity="channel")
    r = Recipe(default=QuantScheme(), overrides=(Override(r"down_proj", eight), Override(r"layers\.0\.", None)))
    assert r.scheme_for("model.layers.3.mlp.down_proj") == eight
    assert r.scheme_for("model.layers.0.self_attn.q_proj") is None
    assert r.scheme_for("lm_head") is None
    assert r.scheme_for("model.layers.3.self_attn.q_proj") == QuantScheme()
    path = tmp_path / "r.yaml"
    path.write_text(r.dumps())
    assert Recipe.load(path) == r


def test_recipe_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: rtn\nbogus: 1\n")
    with pytest.raises(ValueError, match="unknown recipe keys"):
        Recipe.load(bad)
    with pytest.raises(FileNotFoundError):
        Recipe.load(tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match="not a valid regular expression"):
        Override("(", None)

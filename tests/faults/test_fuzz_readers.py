"""Property-based fuzzing of the readers of files lowbit did not necessarily write (issue 16, part 5):
the lowbit checkpoint reader (``load_quantized``, ``checkpoint_info``), the GGUF reader
(``check_gguf`` over gguf-py's ``GGUFReader``) and the recipe reader (``Recipe.load``).

The property: any input either loads or raises one of lowbit's one-line errors, a ``ValueError``,
``TypeError`` or ``OSError`` that lowbit itself raised (so its message names the file and the
problem) with a single line, which the CLI shows as such. Inputs are valid files with bytes
truncated, flipped or overwritten, and, for the JSON and YAML readers, valid structures with a
value replaced by an arbitrary one. Derandomized: the same examples every run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lowbit.boundary import raised_in_lowbit

EXAMPLES = 600  # per strategy; two strategies per reader, so 1,200 examples each
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def loads_or_refuses(tally, reader: str, call, *args: Any, **kwargs: Any) -> None:
    """Run one example: ``call`` returns, or raises one of lowbit's one-line errors (counted in ``tally``)."""
    tally[f"fuzz_examples_{reader}"] += 1
    try:
        call(*args, **kwargs)
    except (ValueError, TypeError, OSError) as e:
        assert raised_in_lowbit(e) or isinstance(e, OSError), f"{type(e).__name__} from outside lowbit: {e}"
        assert str(e).strip() and "\n" not in str(e).strip(), f"not one line: {e!r}"
        tally[f"fuzz_refused_{reader}"] += 1
        return
    tally[f"fuzz_loaded_{reader}"] += 1


# ---- byte-level mutations ----

mutation = st.tuples(st.sampled_from(["truncate", "flip", "overwrite"]), st.floats(0, 1, exclude_max=True),
                     st.integers(0, 7), st.binary(min_size=1, max_size=16))


def _mutated(data: bytes, mutations: list[tuple[str, float, int, bytes]]) -> bytes:
    out = bytearray(data)
    for kind, where, bit, junk in mutations:
        if not out:
            break
        at = int(where * len(out))
        if kind == "truncate":
            del out[at:]
        elif kind == "flip":
            out[at] ^= 1 << bit
        else:
            out[at:at + len(junk)] = junk
    return bytes(out)


# ---- structural mutations of JSON-like data ----

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path to a value inside nested dicts and lists."""
    found = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            found += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found += _paths(v, (*prefix, i))
    return found


def _replaced(value: Any, path: tuple, new: Any) -> Any:
    if not path:
        return new
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[path[0]] = _replaced(value[path[0]], path[1:], new)
    return copy


def _replace_somewhere(data: st.DataObject, value: Any, under: tuple = ()) -> Any:
    """``value`` with one sub-value (under ``under``) replaced by an arbitrary JSON value."""
    paths = [p for p in _paths(value) if p[:len(under)] == under]
    return _replaced(value, data.draw(st.sampled_from(paths)), data.draw(json_values))


# ---- the lowbit checkpoint reader ----

@dataclass
class Scratch:
    """Where examples are written, and the original bytes of each file (kept out of failure reports)."""

    path: Path
    originals: dict[str, bytes] = field(repr=False)


@pytest.fixture(scope="module")
def fuzz_checkpoint(mini_checkpoint, tmp_path_factory) -> Scratch:
    """A scratch checkpoint directory (config and weights only: the tokenizer is not the reader's)."""
    return Scratch(tmp_path_factory.mktemp("fuzz_ckpt"),
                   {name: (mini_checkpoint / name).read_bytes() for name in ("config.json", "model.safetensors")})


def _read_checkpoint(directory: Path) -> None:
    from lowbit.io.checkpoint import checkpoint_info, load_quantized

    checkpoint_info(directory, verify=False)
    load_quantized(directory, verify=False)


@FUZZ
@given(name=st.sampled_from(["config.json", "model.safetensors"]), mutations=st.lists(mutation, min_size=1, max_size=3))
def test_checkpoint_reader_on_mutated_bytes(fuzz_checkpoint, fault_report, name, mutations):
    directory, originals = fuzz_checkpoint.path, fuzz_checkpoint.originals
    for n, data in originals.items():
        (directory / n).write_bytes(_mutated(data, mutations) if n == name else data)
    loads_or_refuses(fault_report, "checkpoint", _read_checkpoint, directory)


@FUZZ
@given(data=st.data())
def test_checkpoint_reader_on_edited_configs(fuzz_checkpoint, fault_report, data):
    directory, originals = fuzz_checkpoint.path, fuzz_checkpoint.originals
    config = json.loads(originals["config.json"])
    under = data.draw(st.sampled_from([("quantization_config",), ("quantization_config", "layers"), ()]))
    (directory / "config.json").write_text(json.dumps(_replace_somewhere(data, config, under)))
    (directory / "model.safetensors").write_bytes(originals["model.safetensors"])
    loads_or_refuses(fault_report, "checkpoint", _read_checkpoint, directory)


@pytest.mark.parametrize("shape", [[0, 64], [64, -1], ["64", 64]])
def test_a_layer_shape_that_is_not_two_positive_integers_is_refused(fuzz_checkpoint, shape):
    """Found by the fuzzer above: a zero dimension divided by zero in ``checkpoint_info``."""
    from lowbit.io.checkpoint import checkpoint_info

    directory, originals = fuzz_checkpoint.path, fuzz_checkpoint.originals
    config = json.loads(originals["config.json"])
    next(iter(config["quantization_config"]["layers"].values()))["shape"] = shape
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "model.safetensors").write_bytes(originals["model.safetensors"])
    with pytest.raises(ValueError, match="is not two positive integers"):
        checkpoint_info(directory, verify=False)


# ---- the GGUF reader ----

@pytest.fixture(scope="module")
def fuzz_gguf(mini_gguf, tmp_path_factory) -> Scratch:
    return Scratch(tmp_path_factory.mktemp("fuzz_gguf") / "m.gguf", {"m.gguf": mini_gguf.read_bytes()})


@FUZZ
@given(mutations=st.lists(mutation, min_size=1, max_size=3))
def test_gguf_reader_on_mutated_bytes(fuzz_gguf, fault_report, mutations):
    from lowbit.gguf.check import check_gguf

    path, original = fuzz_gguf.path, fuzz_gguf.originals["m.gguf"]
    path.write_bytes(_mutated(original, mutations))
    loads_or_refuses(fault_report, "gguf", check_gguf, path)


@FUZZ
@given(head=st.integers(0, 4096), mutations=st.lists(mutation, min_size=1, max_size=4))
def test_gguf_reader_on_mutated_headers(fuzz_gguf, fault_report, head, mutations):
    """Mutations confined to the header, key-values and tensor table, where the parser reads counts,
    lengths and offsets: the bytes most likely to send it astray."""
    from lowbit.gguf.check import check_gguf

    path, original = fuzz_gguf.path, fuzz_gguf.originals["m.gguf"]
    path.write_bytes(_mutated(original[:head + 24], mutations) + original[head + 24:])
    loads_or_refuses(fault_report, "gguf", check_gguf, path)


# ---- the recipe reader ----

RECIPE = {
    "method": "gptq", "method_config": {"damp": 0.01, "act_order": True},
    "transforms": [{"name": "smoothquant", "config": {"alpha": 0.5}}],
    "default": {"format": "int", "bits": 4, "granularity": "group", "group_size": 32, "symmetric": False},
    "overrides": [{"pattern": "down_proj", "scheme": {"format": "nf4", "bits": 4, "group_size": 64}},
                  {"pattern": "o_proj", "scheme": None}],
    "skip": ["lm_head"], "group_fallback": "channel",
    "activations": {"format": "int8", "dynamic": False, "granularity": "tensor", "observer": "percentile"},
}


@pytest.fixture(scope="module")
def recipe_path(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz_recipe") / "r.yaml"


def _load_recipe(path: Path) -> None:
    from lowbit.pipeline.recipe import Recipe

    Recipe.load(path)


@FUZZ
@given(as_yaml=st.booleans(), mutations=st.lists(mutation, min_size=1, max_size=3))
def test_recipe_reader_on_mutated_bytes(recipe_path, fault_report, as_yaml, mutations):
    import yaml

    text = yaml.safe_dump(RECIPE) if as_yaml else json.dumps(RECIPE)
    recipe_path.write_bytes(_mutated(text.encode(), mutations))
    loads_or_refuses(fault_report, "recipe", _load_recipe, recipe_path)


@FUZZ
@given(data=st.data())
def test_recipe_reader_on_edited_recipes(recipe_path, fault_report, data):
    recipe_path.write_text(json.dumps(_replace_somewhere(data, RECIPE)))
    loads_or_refuses(fault_report, "recipe", _load_recipe, recipe_path)


def test_the_fuzzed_inputs_are_valid_to_begin_with(fuzz_checkpoint, mini_gguf, recipe_path):
    """Each reader loads the unmutated input, so the refusals above are the mutations' doing."""
    from lowbit.gguf.check import check_gguf

    directory, originals = fuzz_checkpoint.path, fuzz_checkpoint.originals
    for name, data in originals.items():
        (directory / name).write_bytes(data)
    _read_checkpoint(directory)
    check_gguf(mini_gguf)
    recipe_path.write_text(json.dumps(RECIPE))
    _load_recipe(recipe_path)

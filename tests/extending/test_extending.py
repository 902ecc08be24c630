"""Extending lowbit: a toy format and a toy method, each added in one file, quantize, save, reload and
evaluate a model."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from lowbit.api import load, quantize
from lowbit.evaluate.perplexity import evaluate_windows
from lowbit.io.checkpoint import load_quantized, save_quantized
from lowbit.formats import FORMATS, FormatName
from lowbit.methods import METHODS, get_method
from lowbit.pipeline.recipe import Recipe
from lowbit.scheme import QuantScheme

@pytest.fixture(scope="module")
def toys():
    """The toy modules, imported from this folder as a user's own modules would be; their table entries
    are removed afterwards so that the tests of each table see lowbit's own entries only."""
    modules = {}
    for name in ("toy_format", "toy_method"):
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
        modules[name] = sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(modules[name])
    yield modules["toy_format"], modules["toy_method"]
    FORMATS.pop(modules["toy_format"].CUBIC3)
    FormatName._declared.pop("cubic3")
    METHODS.pop("toy-shrink")
    for name in modules:
        sys.modules.pop(name)


def _windows(n=2, length=64):
    return torch.randint(3, 500, (n, length), generator=torch.Generator().manual_seed(0))


def test_toy_format_end_to_end(toys, tiny_llama_dir, tmp_path):
    toy_format, _ = toys
    model, tokenizer = load(str(tiny_llama_dir))
    float_model, _ = load(str(tiny_llama_dir))
    recipe = Recipe(default=QuantScheme(format=toy_format.CUBIC3, bits=3, group_size=64))
    quantize(model, recipe, progress=False)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.scheme.format is toy_format.CUBIC3 and layer.quantized_weight().bits_per_weight == 3 + 16 / 64
    save_quantized(model, tmp_path / "toy", recipe=recipe, tokenizer=tokenizer)
    loaded, _ = load_quantized(tmp_path / "toy")
    ids = _windows()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    result = evaluate_windows(loaded, ids, bos_id=None, reference=float_model, progress=False)
    assert 0 < result.kld < 1 and result.ppl > 1


def test_toy_method_end_to_end(toys, tiny_llama_dir, tmp_path):
    assert get_method("toy-shrink").calibrated
    model, tokenizer = load(str(tiny_llama_dir))
    float_model, _ = load(str(tiny_llama_dir))
    recipe = Recipe(method="toy-shrink", default=QuantScheme(bits=3, group_size=64, symmetric=False))
    report = quantize(model, recipe, calibration=_windows(8, 64), progress=False)
    assert set(report.method_of.values()) == {"toy-shrink"}
    save_quantized(model, tmp_path / "shrink", recipe=recipe, tokenizer=tokenizer)
    loaded, _ = load_quantized(tmp_path / "shrink")
    ids = _windows()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    rtn, _ = load(str(tiny_llama_dir))
    quantize(rtn, Recipe(default=recipe.default), progress=False)
    ours = evaluate_windows(loaded, ids, bos_id=None, reference=float_model, progress=False)
    plain = evaluate_windows(rtn, ids, bos_id=None, reference=float_model, progress=False)
    assert ours.kld < plain.kld  # the output-error search beats plain rounding

"""``from_pretrained(..., quantization_config=LowbitConfig(...))``: quantized on load, saved and loaded back."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import lowbit
from lowbit.nn import QuantLinear
from lowbit.nn.int8_linear import Int8OutlierLinear


def _ids() -> torch.Tensor:
    return torch.randint(3, 500, (2, 48), generator=torch.Generator().manual_seed(0))


def _kl(ref: torch.Tensor, out: torch.Tensor) -> float:
    p = ref.log_softmax(-1)
    return float((p.exp() * (p - out.float().log_softmax(-1))).sum(-1).mean())


@pytest.fixture(scope="module")
def reference_logits(tiny_llama_dir):
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)(_ids()).logits


@pytest.mark.parametrize("kwargs, module_type, max_kl", [
    ({"load_in_4bit": True}, QuantLinear, 0.05),
    ({"load_in_4bit": True, "quant_type": "fp4", "double_quant": False}, QuantLinear, 0.1),
    ({"load_in_8bit": True}, Int8OutlierLinear, 0.002),
])
def test_quantized_on_load(tiny_llama_dir, reference_logits, kwargs, module_type, max_kl):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=lowbit.LowbitConfig(**kwargs))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(layers) == 2 * 7 and all(type(m) is module_type for m in layers.values())
    assert not isinstance(model.lm_head, QuantLinear)  # skipped by default, as QLoRA does
    assert not any(p.is_meta for p in [*model.parameters(), *model.buffers()])
    with torch.no_grad():
        assert _kl(reference_logits, model(_ids()).logits) < max_kl


def test_nf4_scheme_is_the_qlora_one(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=lowbit.LowbitConfig(
        load_in_4bit=True, block_size=64, compute_dtype=torch.bfloat16))
    layer = model.model.layers[0].mlp.down_proj
    assert layer.scheme.describe() == "nf4 g64 dq" and layer.compute_dtype is torch.bfloat16
    assert layer.quantized_weight().bits_per_weight == pytest.approx(4.127, abs=0.01)


@pytest.mark.parametrize("kwargs", [{"load_in_4bit": True}, {"load_in_8bit": True}])
def test_save_pretrained_round_trip(tiny_llama_dir, tmp_path, kwargs):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=lowbit.LowbitConfig(**kwargs))
    model.save_pretrained(tmp_path / "q")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q")  # plain: the config says how
    by_lowbit, _ = lowbit.load(tmp_path / "q")
    with torch.no_grad():
        expected = model(_ids()).logits
        assert torch.equal(again(_ids()).logits, expected)
        assert torch.equal(by_lowbit(_ids()).logits, expected)


def test_lowbit_checkpoint_loads_through_from_pretrained(tiny_llama_dir, tmp_path):
    model, tokenizer = lowbit.load(str(tiny_llama_dir))
    recipe = lowbit.Recipe(default=lowbit.QuantScheme(format="int", bits=4, group_size=64, symmetric=False))
    lowbit.quantize(model, recipe, progress=False)
    lowbit.save_quantized(model, tmp_path / "ckpt", recipe=recipe, tokenizer=tokenizer)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert isinstance(loaded.model.layers[1].self_attn.o_proj, QuantLinear)
    with torch.no_grad():
        assert torch.equal(loaded(_ids()).logits, model(_ids()).logits)


@pytest.mark.parametrize("kwargs, message", [
    ({"load_in_4bit": True, "load_in_8bit": True}, "exclusive"),
    ({}, "needs load_in_4bit=True or load_in_8bit=True"),
    ({"load_in_4bit": True, "quant_type": "int3"}, "quant_type must be one of"),
    ({"load_in_4bit": True, "compute_dtype": "float64"}, "compute_dtype must be one of"),
    ({"load_in_4bit": True, "block_size": 0}, "block_size must be a positive integer"),
])
def test_config_refuses_nonsense(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lowbit.LowbitConfig(**kwargs)


def test_block_size_that_does_not_divide_fails_before_loading(tiny_llama_dir):
    with pytest.raises(ValueError, match="block_size=96 does not divide in_features=512"):
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir,
                                             quantization_config=lowbit.LowbitConfig(load_in_4bit=True, block_size=96))

"""Hadamard rotation (QuaRot): exact in float, survives quantization and checkpoints, refused where it cannot hold."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lowbit.act_scheme import ActScheme
from lowbit.api import quantize
from lowbit.io.checkpoint import checkpoint_info, load_quantized, save_quantized
from lowbit.methods.rotation import rotate_model
from lowbit.nn import quantized_layers, set_submodule
from lowbit.nn.input_hadamard import add_input_hadamard, has_input_hadamard
from lowbit.pipeline.recipe import Recipe

INT8 = ActScheme()


def _model(kind: str, tied: bool) -> nn.Module:
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    config_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if kind == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    torch.manual_seed(0)
    model = model_cls(config_cls(hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=tied)).eval()
    with torch.no_grad():  # non-trivial norm weights and biases, so folding them is tested
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand_like(p) + 0.5)
            elif name.endswith("bias"):
                p.copy_(torch.randn_like(p))
    return model


def _ids(samples: int, seqlen: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 512, (samples, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("kind", "tied"), [("llama", True), ("llama", False), ("qwen2", True)])
def test_rotation_leaves_float_logits_unchanged(kind, tied):
    model = _model(kind, tied)
    ids = _ids(2, 24, 0)
    with torch.no_grad():
        ref = model(ids).logits
        rotate_model(model)
        out = model(ids).logits
    assert (out - ref).abs().max() < 1e-4 * ref.abs().max()
    assert model.lm_head.weight is not model.model.embed_tokens.weight and not model.config.tie_word_embeddings
    assert all(has_input_hadamard(layer.mlp.down_proj) for layer in model.model.layers)
    assert torch.all(model.model.layers[0].input_layernorm.weight == 1)


def test_rotation_spreads_the_residual_outlier_channel():
    model = _model("llama", tied=True)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 3] *= 50  # one residual channel carries most of the magnitude
        seen = {}
        hook = model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(
            lambda m, a: seen.__setitem__("x", a[0]))
        model(_ids(1, 16, 0))
        before = seen["x"].abs().amax(-1) / seen["x"].abs().mean(-1)
        rotate_model(model)
        model(_ids(1, 16, 0))
        after = seen["x"].abs().amax(-1) / seen["x"].abs().mean(-1)
        hook.remove()
    assert after.mean() < before.mean() / 4  # max/mean of a Gaussian row of 256: about 3


def test_hooks_see_the_rotated_input_and_replacements_keep_the_rotation():
    linear = nn.Linear(12, 4)
    add_input_hadamard(linear)
    seen = {}
    linear.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    x = torch.eye(12)
    linear(x)
    assert not torch.equal(seen["x"], x)  # a hook registered later sees the rotated input
    parent = nn.Sequential(linear)
    set_submodule(parent, "0", nn.Linear(12, 4))
    assert has_input_hadamard(parent[0])


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_rotated_w8a8_checkpoint_reloads_bit_identically(method, tmp_path):
    model = _model("llama", tied=True)
    ids = _ids(2, 16, 5)
    with torch.no_grad():
        ref = model(ids).logits
    act = ActScheme(dynamic=False, granularity="tensor", observer="mse")
    recipe = Recipe(method=method, default=act.weight_scheme(), activations=act, transforms=("hadamard",))
    quantize(model, recipe, calibration=_ids(16, 64, 0), progress=False)
    save_quantized(model, tmp_path / "rot", recipe=recipe)
    loaded, _ = load_quantized(tmp_path / "rot")
    with torch.no_grad():
        out = model(ids).logits
        assert torch.equal(loaded(ids).logits, out)
    assert (out - ref).norm() / ref.norm() < 0.05
    rows = {r["name"]: r for r in checkpoint_info(tmp_path / "rot")["layers"]}
    assert rows["model.layers.1.mlp.down_proj"].get("input_hadamard") and "input_hadamard" not in rows[
        "model.layers.1.mlp.up_proj"]
    assert all(has_input_hadamard(m) == name.endswith("down_proj") for name, m in quantized_layers(loaded).items())
    assert Recipe.from_dict(recipe.to_dict()) == recipe


def test_rotation_is_refused_where_it_cannot_hold():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    gemma = Gemma3ForCausalLM(Gemma3TextConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                                               num_attention_heads=4, num_key_value_heads=1, head_dim=64,
                                               vocab_size=512))
    with pytest.raises(ValueError, match="pre-norm RMSNorm decoders"):
        rotate_model(gemma)
    model = _model("llama", tied=True)
    with pytest.raises(ValueError, match="does not compose with 'smoothquant'"):
        quantize(copy.deepcopy(model), Recipe(transforms=("hadamard", "smoothquant"), default=INT8.weight_scheme()),
                 calibration=_ids(16, 64, 0), progress=False)
    quantize(model, Recipe(default=INT8.weight_scheme()), progress=False)
    with pytest.raises(ValueError, match="needs the float model"):
        rotate_model(model)
    with pytest.raises(ValueError, match="unknown rotation"):
        Recipe.from_dict({"rotation": "random"})
    with pytest.raises(ValueError, match="unknown transform 'random'"):
        Recipe(transforms=("random",))


def test_gguf_export_refuses_an_online_rotation(tmp_path):
    from lowbit.api import export

    model = _model("llama", tied=True)
    rotate_model(model)
    with pytest.raises(ValueError, match="llama.cpp does not run"):
        export(model, None, tmp_path / "m.gguf", to="gguf", type="F16")
    assert not (tmp_path / "m.gguf").exists()

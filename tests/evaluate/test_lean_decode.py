"""The lean decode loop against transformers' forward: same logits up to float32 rounding, same tokens."""

import pytest
import torch

from lowbit.api import load, quantize
from lowbit.evaluate.generate import generate, resolve_loop
from lowbit.evaluate.lean_decode import LeanDecoder, lean_decoder_support
from lowbit.kernels import int8_activations_reason, status
from lowbit.nn import prepare_kernels
from lowbit.pipeline.recipe import Recipe
from lowbit.scheme import QuantScheme

pytestmark = pytest.mark.skipif(status() is not None, reason=f"lowbit kernels unavailable: {status()}")


def _prompt(n=12, seed=0, vocab=500):
    return torch.randint(3, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def _qwen2_with_biases():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512, max_position_embeddings=128)
    model = Qwen2ForCausalLM(config).eval()
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            p.data.normal_(0, 0.5)  # transformers starts biases at zero: make the fused bias matter
    return model


@pytest.fixture(params=["llama", "llama-int4", "qwen2-int4"])
def model(request, tiny_llama_dir):
    if request.param.startswith("qwen2"):
        model = _qwen2_with_biases()
    else:
        model, _ = load(str(tiny_llama_dir))
    if request.param.endswith("int4"):
        quantize(model, Recipe(default=QuantScheme(bits=4, group_size=64, symmetric=False)), progress=False)
        assert "reference" not in prepare_kernels(model)
    return model.eval()


def test_logits_equal_the_model_forward_up_to_rounding(model):
    ids = _prompt(20)
    decoder = LeanDecoder(model, 32)
    with torch.inference_mode():
        full = model(input_ids=ids).logits[0]
        got = [decoder(ids[:, :9]), decoder(ids[:, 9:10]), decoder(ids[:, 10:16])]  # prefill, one, a chunk
        got += [decoder(ids[:, i:i + 1]) for i in range(16, 20)]
    expected = [full[8], full[9], full[15], *full[16:20]]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g[0], e, rtol=1e-4, atol=1e-4)


def test_greedy_tokens_equal_the_transformers_loop(model):
    ids = _prompt(seed=3)
    lean = generate(model, ids, 16, loop="lean")
    theirs = generate(model, ids, 16, loop="transformers")
    assert lean.loop == "lean" and theirs.loop == "transformers"
    assert lean.tokens == theirs.tokens
    assert generate(model, ids, 16).loop == "lean"  # auto


def test_the_cache_refuses_to_overflow(tiny_llama_dir):
    model, _ = load(str(tiny_llama_dir))
    decoder = LeanDecoder(model.eval(), 8)
    decoder(_prompt(8))
    with pytest.raises(ValueError, match="holds 8 positions; 9 were asked for"):
        decoder(_prompt(1))


def test_models_it_does_not_cover_take_the_transformers_loop(tiny_llama_dir):
    model, _ = load(str(tiny_llama_dir))
    model = model.to(torch.bfloat16).eval()
    assert "float32 models on the CPU" in lean_decoder_support(model)
    assert resolve_loop(model, "auto") == "transformers"
    with pytest.raises(ValueError, match="float32 models on the CPU; use the transformers loop"):
        generate(model, _prompt(), 2, loop="lean")
    with pytest.raises(ValueError, match="loop must be one of"):
        generate(model, _prompt(), 2, loop="fast")


@pytest.mark.skipif(int8_activations_reason(QuantScheme(bits=4, group_size=64)) is not None,
                    reason="no int8-activation kernels on this CPU")
def test_rounded_activations_stay_close_to_exact(tiny_llama_dir):
    model, _ = load(str(tiny_llama_dir))
    quantize(model, Recipe(default=QuantScheme(bits=4, group_size=64, symmetric=False)), progress=False)
    model.eval()
    ids = _prompt(seed=4)
    assert set(prepare_kernels(model)) == {"lowbit-cpu/int16"}  # auto
    assert set(prepare_kernels(model, activations="float32")) == {"lowbit-cpu"}
    with torch.inference_mode():
        exact = LeanDecoder(model, 16)(ids)
    for activations, tolerance in (("int16", 1e-3), ("int8", 0.2)):
        assert set(prepare_kernels(model, activations=activations)) == {f"lowbit-cpu/{activations}"}
        with torch.inference_mode():
            # prefill: exact weights through the GEMM; one decode token: x rounded per block of 64
            decoder = LeanDecoder(model, 16)
            decoder(ids[:, :-1])
            got = decoder(ids[:, -1:])
        assert (got - exact).abs().max() < tolerance * exact.abs().max()
    with pytest.raises(ValueError, match="activations must be one of"):
        prepare_kernels(model, activations="int4")


def test_layers_that_cannot_round_activations_say_so_once(tiny_llama_dir):
    model, _ = load(str(tiny_llama_dir))
    quantize(model, Recipe(default=QuantScheme(format="nf4", bits=4, group_size=64)), progress=False)
    with pytest.warns(UserWarning, match=r"quantized layers keep float32 activations instead of int8, e\.g\."):
        assert set(prepare_kernels(model, activations="int8")) == {"lowbit-cpu"}


@pytest.mark.parametrize("shared", [True, False])
def test_codebook_layers_run_in_the_one_call_decode_step(tiny_llama_dir, shared):
    """vq layers (product quantization's shared codebooks, or codebooks per row) are decode_layer parts."""
    from lowbit.nn import QuantLinear, set_submodule
    from lowbit.qweight import QuantizedWeight, WeightLayout

    model, _ = load(str(tiny_llama_dir))
    g = torch.Generator().manual_seed(0)
    grouping = dict(group_size=64, shared_codebook=True) if shared else dict(granularity="channel")
    scheme = QuantScheme(format="vq", bits=8 if shared else 4, vector_dim=4, **grouping)
    for name, module in list(model.model.layers.named_modules()):
        if isinstance(module, torch.nn.Linear):
            layout = WeightLayout(scheme, tuple(module.weight.shape))
            codebook = torch.randn(layout.n_codebooks, 2**scheme.bits, 4, generator=g) * 0.05
            codes = torch.randint(0, 2**scheme.bits, (module.out_features, module.in_features // 4), dtype=torch.uint8,
                                  generator=g)
            set_submodule(model.model.layers, name, QuantLinear.from_quantized(
                QuantizedWeight.from_codebook(codes, codebook, scheme)))
    assert "reference" not in prepare_kernels(model)
    decoder = LeanDecoder(model, 32)
    assert decoder.plan is not None  # every layer in the one-call plan
    ids = _prompt(seed=5)
    assert generate(model, ids, 12, loop="lean").tokens == generate(model, ids, 12, loop="transformers").tokens

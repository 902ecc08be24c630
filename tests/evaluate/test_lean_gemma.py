"""The Gemma 3 lean decode loop against transformers' forward: same logits up to float32 rounding, same
tokens, across the sliding window."""

import pytest
import torch

from lowbit.api import quantize
from lowbit.evaluate.generate import generate, resolve_loop
from lowbit.evaluate.lean_decode import lean_decoder, lean_decoder_support
from lowbit.evaluate.lean_gemma import GemmaLeanDecoder
from lowbit.kernels import status
from lowbit.nn import prepare_kernels
from lowbit.pipeline.recipe import Recipe
from lowbit.scheme import QuantScheme

pytestmark = pytest.mark.skipif(status() is not None, reason=f"lowbit kernels unavailable: {status()}")
WINDOW = 8  # the local layers' window: the tests run past it


def _gemma(**overrides):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=64, vocab_size=512, max_position_embeddings=128,
                              sliding_window=WINDOW, layer_types=["sliding_attention", "sliding_attention",
                                                                  "full_attention"], **overrides)
    model = Gemma3ForCausalLM(config).eval()
    for name, p in model.named_parameters():
        if "norm" in name:
            p.data.normal_(0, 0.5)  # Gemma starts its norms at zero (a scale of 1): make them matter
    return model


def _prompt(n=12, seed=0):
    return torch.randint(3, 512, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=["float", "int4"])
def model(request):
    model = _gemma()
    if request.param == "int4":
        quantize(model, Recipe(default=QuantScheme(bits=4, group_size=64, symmetric=False)), progress=False)
        # exact decode products: the rounded-activation kernels have their own tests against these
        assert "reference" not in prepare_kernels(model, activations="float32")
    return model


def test_logits_equal_the_model_forward_up_to_rounding(model):
    ids = _prompt(24)
    decoder = lean_decoder(model, 32)
    assert isinstance(decoder, GemmaLeanDecoder)
    with torch.inference_mode():
        full = model(input_ids=ids).logits[0]
        got = [decoder(ids[:, :5]), decoder(ids[:, 5:6]), decoder(ids[:, 6:14])]  # prefill, one, a chunk past the window
        got += [decoder(ids[:, i:i + 1]) for i in range(14, 24)]  # one at a time, the window sliding
    expected = [full[4], full[5], full[13], *full[14:24]]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g[0], e, rtol=1e-4, atol=1e-4)


def test_greedy_tokens_equal_the_transformers_loop(model):
    ids = _prompt(seed=3)
    lean = generate(model, ids, 20, loop="lean")  # 32 positions: past the window
    theirs = generate(model, ids, 20, loop="transformers")
    assert lean.loop == "lean" and resolve_loop(model, "auto") == "lean"
    assert lean.tokens == theirs.tokens


def test_what_it_does_not_cover_is_named():
    assert "cap logits" in lean_decoder_support(_gemma(final_logit_softcapping=30.0))
    assert "bidirectional" in lean_decoder_support(_gemma(use_bidirectional_attention=True))
    assert resolve_loop(_gemma(final_logit_softcapping=30.0), "auto") == "transformers"

"""A quantized LM head tied to the input embedding: one copy of the codes, lookups decode rows."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lowbit.io.checkpoint import checkpoint_info, load_quantized, save_quantized
from lowbit.methods.rtn import quantize_rtn
from lowbit.nn import QuantEmbedding, QuantLinear, set_submodule, tie_quantized_embedding
from lowbit.pipeline.recipe import Recipe
from lowbit.scheme import QuantScheme

SCHEMES = [QuantScheme(bits=4, group_size=64, symmetric=False), QuantScheme(format="nf4", group_size=64,
                                                                               double_quant=True),
           QuantScheme(bits=8, granularity="channel"), QuantScheme(bits=4, granularity="tensor")]


def _tied_model():
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=768, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def test_dequantize_rows_equals_rows_of_dequantize():
    w = torch.randn(768, 256, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([5, 0, 767, 5, 300])
    for scheme in SCHEMES:
        qw = quantize_rtn(w, scheme)
        assert torch.equal(qw.dequantize_rows(ids), qw.dequantize()[ids]), scheme.describe()


def test_tied_head_and_embedding_share_codes_and_survive_a_checkpoint(tmp_path):
    model = _tied_model()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    qw = quantize_rtn(model.lm_head.weight.data, QuantScheme(bits=8, group_size=64))
    set_submodule(model, "lm_head", QuantLinear.from_quantized(qw))
    assert tie_quantized_embedding(model) == "model.embed_tokens"
    assert isinstance(model.model.embed_tokens, QuantEmbedding) and not model.config.tie_word_embeddings
    ids = torch.randint(0, 768, (2, 9), generator=torch.Generator().manual_seed(1))
    assert torch.equal(model.model.embed_tokens(ids), qw.dequantize()[ids])
    assert not any("embed_tokens" in k for k in model.state_dict())  # stored once, under lm_head
    with torch.no_grad():
        want = model(ids).logits
    save_quantized(model, tmp_path / "ck", recipe=Recipe(skip=()))
    loaded, _ = load_quantized(tmp_path / "ck")
    assert loaded.model.embed_tokens.head is loaded.lm_head
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, want)
    info = checkpoint_info(tmp_path / "ck")
    assert info["float_tensors"] == sum(1 for k in model.state_dict() if not k.startswith("lm_head."))
    assert info["quantized_layers"] == 1 and info["bpw"] == qw.bits_per_weight


def test_untied_or_float_heads_are_left_alone():
    model = _tied_model()
    assert tie_quantized_embedding(model) is None  # the head is still float
    model.config.tie_word_embeddings = False
    set_submodule(model, "lm_head", QuantLinear.from_quantized(quantize_rtn(model.lm_head.weight.data,
                                                                            QuantScheme(bits=8, group_size=64))))
    assert tie_quantized_embedding(model) is None
    assert isinstance(model.model.embed_tokens, torch.nn.Embedding)



def test_a_tied_quantized_head_exports_to_gguf_as_one_tied_tensor(tiny_llama_dir, tmp_path):
    from lowbit.api import load
    from lowbit.gguf.export import export_gguf
    from lowbit.nn.float_view import float_view

    model, tokenizer = load(str(tiny_llama_dir))
    model.lm_head.weight = model.model.embed_tokens.weight
    model.config.tie_word_embeddings = True
    qw = quantize_rtn(model.lm_head.weight.data, QuantScheme(bits=8, group_size=32))  # Q8_0's grid
    set_submodule(model, "lm_head", QuantLinear.from_quantized(qw))
    tie_quantized_embedding(model)
    ids = torch.randint(0, model.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(ids).logits
        with float_view(model):
            assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
            torch.testing.assert_close(model(ids).logits, want)
    assert isinstance(model.model.embed_tokens, QuantEmbedding)  # put back
    report = export_gguf(model, tokenizer, tmp_path / "t.gguf", "Q8_0")
    assert report.copied == ["token_embd.weight"] and not report.requantized  # once, code for code

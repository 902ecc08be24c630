"""Allocation on a tiny tied Llama: the budget is met in stored bits, the recipe round-trips and gives
each layer its chosen scheme, the tied embedding stays tied, the GGUF file has the chosen types."""

from __future__ import annotations

import gguf
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import lowbit
from lowbit.auto import Budget, allocate, allocate_gguf, parse_size
from lowbit.auto.allocate import block_linears
from lowbit.nn import QuantEmbedding, QuantLinear
from lowbit.pipeline.recipe import Recipe


@pytest.fixture(scope="module")
def tied(tiny_llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # uneven layers, so the allocation has something to choose
        model.model.layers[1].mlp.down_proj.weight.mul_(4.0)
    calib = torch.randint(3, len(tokenizer), (4, 64), generator=torch.Generator().manual_seed(0))
    return model, tokenizer, calib


def _fresh(model):
    copy = LlamaForCausalLM(model.config).eval()
    copy.load_state_dict(model.state_dict())
    copy.tie_weights()
    return copy


def test_bpw_budget_is_met_in_stored_bits_and_the_recipe_round_trips(tied):
    model, _, calib = tied
    allocation = allocate(model, calib, Budget(bpw=3.5), progress=False)
    names = block_linears(model)
    assert [c.name for c in allocation.choices] == names
    assert len(set(c.candidate for c in allocation.choices)) > 1  # mixed, not one scheme
    recipe = Recipe.from_dict(allocation.recipe.to_dict())
    assert recipe == allocation.recipe
    quantized = _fresh(model)
    lowbit.quantize(quantized, recipe, progress=False)
    layers = {n: m for n, m in quantized.named_modules() if isinstance(m, QuantLinear)}
    assert sorted(layers) == sorted(names)  # the head stays float under a bpw budget
    stored = sum(layers[n].quantized_weight().storage_bits() for n in names)
    weights = sum(layers[n].in_features * layers[n].out_features for n in names)
    assert stored == allocation.bits <= allocation.budget_bits <= 3.5 * weights
    for choice in allocation.choices:
        assert layers[choice.name].scheme.describe() == choice.candidate


def test_a_larger_budget_buys_a_smaller_proxy_error(tied):
    model, _, calib = tied
    errors = [sum(c.error for c in allocate(model, calib, Budget(bpw=b), progress=False).choices) for b in (3, 4, 5)]
    assert errors[0] > errors[1] > errors[2]


def test_a_gptq_allocation_scores_errors_as_gptq_leaves_them(tied):
    from lowbit.auto.candidates import LOWBIT_CANDIDATES
    from lowbit.auto.sensitivity import measure_sensitivity

    model, _, calib = tied
    allocation = allocate(model, calib, Budget(bpw=3.5), method="gptq", progress=False)
    table = measure_sensitivity(model, calib, lambda n: LOWBIT_CANDIDATES, block_linears(model), method="gptq",
                                progress=False)
    rtn = measure_sensitivity(model, calib, lambda n: LOWBIT_CANDIDATES, block_linears(model), progress=False)
    for choice in allocation.choices:
        errors = {o.candidate.name: o.error for o in table[choice.name].options}
        assert choice.error == errors[choice.candidate]
        assert choice.error < next(o.error for o in rtn[choice.name].options if o.candidate.name == choice.candidate)
    assert allocation.recipe.method == "gptq"


def test_size_budget_quantizes_the_tied_head_once_and_it_stays_tied(tied, tmp_path):
    model, tokenizer, calib = tied
    size = 1024 * 1024
    allocation = allocate(model, calib, Budget(size_bytes=size), progress=False)
    assert any(c.name == "lm_head" for c in allocation.choices)
    quantized = _fresh(model)
    lowbit.quantize(quantized, allocation.recipe, progress=False)
    embedding = quantized.get_input_embeddings()
    assert isinstance(embedding, QuantEmbedding) and embedding.head is quantized.lm_head
    out = tmp_path / "ckpt"
    lowbit.save_quantized(quantized, out, recipe=allocation.recipe, tokenizer=tokenizer,
                          allocation=allocation.to_dict())
    assert sum(f.stat().st_size for f in out.iterdir() if f.is_file()) <= size
    assert Recipe.load(out / "recipe.json") == allocation.recipe
    reloaded, _ = lowbit.load(out)
    assert isinstance(reloaded.get_input_embeddings(), QuantEmbedding)


def test_gguf_file_has_the_chosen_tensor_types(tied, tmp_path):
    from lowbit.gguf.export import export_gguf

    model, tokenizer, calib = tied
    allocation = allocate_gguf(model, tokenizer, calib, "Q4_K_M", progress=False)
    path = tmp_path / "m.gguf"
    report = export_gguf(model, tokenizer, path, "Q4_K_M", tensor_types=allocation.gguf_types)
    assert report.file_size <= allocation.budget.size_bytes
    reader = gguf.GGUFReader(path)
    names = {hf: t for hf, t in allocation.gguf_types.items()}
    from lowbit.gguf.export import plan_tensors

    gguf_name = {hf: g for hf, g, *_ in plan_tensors(model, "Q4_K_M")}
    written = {t.name: t.tensor_type.name for t in reader.tensors}
    assert {gguf_name[hf]: t for hf, t in names.items()} == {gguf_name[hf]: written[gguf_name[hf]] for hf in names}
    assert "token_embd.weight" in {gguf_name[hf] for hf in names}  # the tied head is the embedding


def test_gguf_allocation_for_gptq_weighs_the_block_errors_as_gptq_leaves_them(tied):
    model, tokenizer, calib = tied
    plain = {c.name: c for c in allocate_gguf(model, tokenizer, calib, "Q4_K_M", progress=False).choices}
    gptq = {c.name: c for c in allocate_gguf(model, tokenizer, calib, "Q4_K_M", method="gptq",
                                             progress=False).choices}
    same = [n for n in block_linears(model) if gptq[n].candidate == plain[n].candidate]
    assert same and all(gptq[n].error < plain[n].error for n in same)  # error feedback takes some of it up
    head = next(n for n in plain if n not in block_linears(model))  # outside the blocks: no GPTQ there
    if gptq[head].candidate == plain[head].candidate:
        assert gptq[head].error == plain[head].error
    with pytest.raises(ValueError, match="rtn .* or gptq, not 'awq'"):
        allocate_gguf(model, tokenizer, calib, "Q4_K_M", method="awq", progress=False)


def test_bad_budgets_and_sizes_are_one_line(tied):
    model, _, calib = tied
    with pytest.raises(ValueError, match=r"below the smallest .* possible 2\.\d+ to 8\.\d+ bits/weight"):
        allocate(model, calib, Budget(bpw=1.0), progress=False)
    with pytest.raises(ValueError, match="above the largest"):
        allocate(model, calib, Budget(bpw=9.0), progress=False)
    with pytest.raises(ValueError, match="needs calibration data"):
        allocate(model, None, Budget(bpw=4.0), progress=False)
    with pytest.raises(ValueError, match="unknown size unit 'MiBB'"):
        parse_size("90MiBB")
    assert parse_size("100.57 MiB") == int(100.57 * 2**20) and parse_size("1KB") == 1000
    with pytest.raises(ValueError, match="below what the checkpoint needs"):
        allocate(model, calib, Budget(size_bytes=1000), progress=False)

"""The sensitivity proxy's statistics and formula against direct computations on a tiny Llama."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lowbit.auto.candidates import Candidate
from lowbit.auto.sensitivity import (LossStatistics, gptq_column_weights, input_hessians, loss_statistics,
                                     measure_sensitivity, score_tensor)
from lowbit.methods.gptq import GPTQConfig
from lowbit.scheme import QuantScheme

INT3 = Candidate.of_scheme(QuantScheme(bits=3, group_size=64, symmetric=False))
INT4 = Candidate.of_scheme(QuantScheme(bits=4, group_size=64, symmetric=False))
NAMES = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]


def _summed_inputs(model, windows, names, statistic):
    """Per linear in ``names``, ``statistic`` of its inputs (``[tokens, in]``) summed over the forward
    passes of ``windows``, computed directly with hooks."""
    seen = {n: 0 for n in names}

    def add(name):
        def hook(module, args):
            seen[name] = seen[name] + statistic(args[0].reshape(-1, args[0].shape[-1]))
        return hook

    handles = [model.get_submodule(n).register_forward_pre_hook(add(n)) for n in names]
    try:
        with torch.no_grad():
            for w in windows:
                model(input_ids=w[None])
    finally:
        for h in handles:
            h.remove()
    return seen


@pytest.fixture(scope="module")
def tiny():
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300, max_position_embeddings=128)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    windows = torch.randint(0, 300, (3, 32), generator=torch.Generator().manual_seed(1))
    return model, windows


def test_statistics_are_the_mean_squared_inputs_and_output_gradients(tiny):
    model, windows = tiny
    stats = loss_statistics(model, windows, NAMES)
    inputs = {n: [] for n in NAMES}
    outputs = {n: [] for n in NAMES}

    def keep(name):
        def hook(module, args, out):
            inputs[name].append(args[0].detach())
            outputs[name].append(out)
        return hook

    handles = [model.get_submodule(n).register_forward_hook(keep(n)) for n in NAMES]
    grads = {n: torch.zeros(model.get_submodule(n).out_features) for n in NAMES}
    try:
        for w in windows:
            for n in NAMES:
                inputs[n].clear(), outputs[n].clear()
            loss = model(input_ids=w[None], labels=w[None]).loss
            got = torch.autograd.grad(loss, [outputs[n][0] for n in NAMES])
            for n, g in zip(NAMES, got):
                grads[n] += g.pow(2).reshape(-1, g.shape[-1]).sum(0)
    finally:
        for h in handles:
            h.remove()
    tokens = windows.numel()
    for n in NAMES:
        torch.testing.assert_close(stats[n].fisher, grads[n] / tokens, rtol=1e-4, atol=1e-12)
    assert all(p.grad is None for p in model.parameters())  # gradients went to activations only


def test_input_moments_are_the_mean_of_x_squared(tiny):
    model, windows = tiny
    stats = loss_statistics(model, windows, NAMES)
    seen = _summed_inputs(model, windows, NAMES, lambda x: x.pow(2).sum(0))
    for n in NAMES:
        torch.testing.assert_close(stats[n].input_sq, seen[n] / windows.numel(), rtol=1e-5, atol=0)


def test_score_is_the_fisher_weighted_diagonal_error():
    g = torch.Generator().manual_seed(2)
    weight = torch.randn(128, 256, generator=g)
    stats = LossStatistics(fisher=torch.rand(128, generator=g), input_sq=torch.rand(256, generator=g))
    option = score_tensor("w", weight, stats, [INT3]).options[0]
    delta = INT3.round_trip(weight) - weight
    per_output = (delta.double().pow(2) * 2 * stats.input_sq.double()).sum(1)
    assert option.error == pytest.approx(float((per_output * stats.fisher.double()).sum()), rel=1e-5)
    assert option.raw_error == pytest.approx(float(per_output.sum()), rel=1e-5)
    assert option.bits == INT3.stored_bits((128, 256))


def test_a_candidate_that_re_hits_the_weights_grid_is_skipped():
    codes = torch.randint(0, 16, (64, 256), generator=torch.Generator().manual_seed(3)).float()
    codes[:, ::64], codes[:, 1::64] = 0, 15  # every group spans the grid, so min-max RTN finds it again
    weight = (codes - 7) * 0.25
    stats = LossStatistics(fisher=torch.ones(64), input_sq=torch.ones(256))
    result = score_tensor("w", weight, stats, [INT3, INT4])
    assert [o.candidate for o in result.options] == [INT3]
    assert "source grid" in result.skipped[INT4.name]


def test_measure_sensitivity_refuses_unknown_names_and_empty_calibration(tiny):
    model, windows = tiny
    with pytest.raises(ValueError, match="no linear called 'model.nope'"):
        measure_sensitivity(model, windows, lambda n: [INT3], ["model.nope"], progress=False)
    with pytest.raises(ValueError, match="calibration token windows"):
        measure_sensitivity(model, windows[:0], lambda n: [INT3], NAMES, progress=False)


def test_gptq_column_weights_of_uncorrelated_inputs_are_the_damped_diagonal():
    """GPTQ has nothing to fold an error into when the inputs are uncorrelated; an unseen input costs 0."""
    d = torch.tensor([3.0, 0.5, 0.0, 2.0])
    got = gptq_column_weights(torch.diag(d), GPTQConfig(damp=0.01))
    mean = float(d.masked_fill(d == 0, 1.0).mean())  # GPTQ counts an unseen input's diagonal as 1
    torch.testing.assert_close(got, (d + 0.01 * mean).masked_fill(d == 0, 0.0))


@pytest.mark.parametrize("act_order, expected", [(True, [2.0, 3.5]), (False, [1.75, 4.0])])
def test_gptq_column_weights_are_the_schur_complements_in_gptq_order(act_order, expected):
    """For H = [[2, 1], [1, 4]] the column quantized first costs its Schur complement (its error is
    partly taken up by the other column), the last its own diagonal; act order starts at the 4."""
    H = torch.tensor([[2.0, 1.0], [1.0, 4.0]])
    got = gptq_column_weights(H, GPTQConfig(damp=1e-7, act_order=act_order))
    torch.testing.assert_close(got, torch.tensor(expected), rtol=1e-5, atol=0)


def test_input_hessians_are_x_t_x_shared_by_readers_and_the_same_in_small_passes(tiny):
    model, windows = tiny
    names = [f"model.layers.0.{n}" for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                             "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    seen = _summed_inputs(model, windows, names, lambda x: x.T @ x)
    shared = list(input_hessians(model, windows, names))
    assert [readers for readers, _ in shared] == [names[:3], names[3:4], names[4:6], names[6:]]
    one_each = list(input_hessians(model, windows, names, memory_bytes=1))
    assert [readers for readers, _ in one_each] == [[n] for n in names]
    for readers, H in [*shared, *one_each]:
        for n in readers:
            torch.testing.assert_close(H, 2 * seen[n] / windows.numel(), rtol=1e-4, atol=1e-6)


def test_gptq_proxy_weighs_the_block_linears_and_leaves_the_head_to_rtn(tiny):
    model, windows = tiny
    names = [*NAMES, "lm_head"]
    rtn = measure_sensitivity(model, windows, lambda n: [INT3], names, progress=False)
    gptq = measure_sensitivity(model, windows, lambda n: [INT3], names, method="gptq", progress=False)
    for n in NAMES:
        assert gptq[n].options[0].error < rtn[n].options[0].error  # GPTQ takes up part of each error
    assert gptq["lm_head"].options[0].error == rtn["lm_head"].options[0].error


@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_column_weights_are_one_over_gptqs_own_inverse_factor_squared(act_order):
    """The one reverse-order factorization gives GPTQ's ``1 / U_ii^2`` (``inverse_hessian_factor``)."""
    from lowbit.methods.gptq import inverse_hessian_factor

    g = torch.Generator().manual_seed(4)
    x = torch.randn(512, 64, generator=g) @ torch.randn(64, 64, generator=g)  # correlated inputs
    x[:, 5] = 0  # one input never seen
    H = 2 * x.T @ x / 512
    config = GPTQConfig(act_order=act_order)
    diag = H.diagonal().masked_fill(H.diagonal() == 0, 1.0)
    perm = torch.argsort(diag, descending=True, stable=True) if act_order else torch.arange(64)
    U = inverse_hessian_factor(H, config, "test", perm=perm)
    expected = torch.empty(64).scatter_(0, perm, U.diagonal().pow(-2))
    expected[5] = 0
    torch.testing.assert_close(gptq_column_weights(H, config), expected, rtol=1e-4, atol=1e-6)


def test_every_candidates_round_trip_is_rtns_stored_weight_exactly():
    """The proxy's unpacked round trip gives the values a checkpoint would store (double
    quantization takes the packed path)."""
    from lowbit.auto.candidates import HEAD_CANDIDATES, LOWBIT_CANDIDATES
    from lowbit.methods.rtn import quantize_rtn

    weight = torch.randn(256, 768, generator=torch.Generator().manual_seed(5)) * 0.05
    for c in {*LOWBIT_CANDIDATES, *HEAD_CANDIDATES}:
        assert torch.equal(c.round_trip(weight), quantize_rtn(weight, c.scheme).dequantize()), c.name

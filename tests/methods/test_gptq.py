"""GPTQ against RTN on the same layer and seed, against a slow OBQ reference, and its exact cases."""

import os

import pytest
import torch

from lowbit.methods.gptq import GPTQConfig, accumulate_hessian, gptq_quantize, gptq_quantize_shared
from lowbit.methods.rtn import quantize_rtn
from lowbit.observers import observe_range
from lowbit.quantizer import dequantize_rows, fake_quantizer, qparams, quantize_rows
from lowbit.scheme import QuantScheme


def correlated_layer(out=128, inp=256, samples=4096, seed=0):
    """Weight ``[out, inp]`` and inputs ``X = Z A`` with a random mixing ``A``: correlated features."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(samples, inp, generator=g) @ torch.randn(inp, inp, generator=g)
    W = torch.randn(out, inp, generator=g) * 0.02
    return W, X


def hessian(X, batches=2):
    H, n = None, 0
    for x in X.chunk(batches):
        H, n = accumulate_hessian(H, x, n)
    return H


def output_error(W, qw, X):
    return ((W - qw.dequantize()) @ X.T).norm().item()


def hadamard(n):
    """Sylvester's +-1 Hadamard matrix: ``Hd^T Hd = n I`` exactly in float arithmetic."""
    Hd = torch.ones(1, 1)
    while Hd.shape[0] < n:
        Hd = torch.cat([torch.cat([Hd, Hd], 1), torch.cat([Hd, -Hd], 1)], 0)
    return Hd


SCHEMES = {
    "int4-channel": QuantScheme(bits=4, granularity="channel"),
    "int3-g64-asym": QuantScheme(bits=3, group_size=64, symmetric=False),
    "nf4-g64": QuantScheme(format="nf4", group_size=64),
    "int4-tensor": QuantScheme(bits=4, granularity="tensor"),
    "int3-g32-asym-fmin": QuantScheme(bits=3, group_size=32, symmetric=False, zero_point="float"),
    "fp4-g32": QuantScheme(format="fp4", group_size=32),
    "fp8_e4m3-channel": QuantScheme(format="fp8_e4m3", bits=8, granularity="channel"),
    "int4-g64-mse": QuantScheme(bits=4, group_size=64, observer="mse"),
    "nf4-g64-dq": QuantScheme(format="nf4", group_size=64, double_quant=True),
}
CONFIGS = {
    "natural": GPTQConfig(act_order=False),
    "act_order-static": GPTQConfig(act_order=True),
    "act_order-dynamic": GPTQConfig(act_order=True, static_groups=False),
}


@pytest.fixture(scope="module")
def layer():
    W, X = correlated_layer()
    return W, X, hessian(X)


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("scheme", SCHEMES.values(), ids=SCHEMES.keys())
def test_beats_rtn_on_correlated_inputs(layer, scheme, config):
    W, X, H = layer
    rtn = output_error(W, quantize_rtn(W, scheme), X)
    gptq = output_error(W, gptq_quantize(W, H, scheme, config), X)
    assert gptq < 0.8 * rtn  # about 0.7 on this layer for every scheme


def test_act_order_static_groups_keep_rtn_scales_and_the_natural_layout(layer):
    W, X, H = layer
    scheme = SCHEMES["int3-g64-asym"]
    rtn = quantize_rtn(W, scheme)
    qw = gptq_quantize(W, H, scheme, GPTQConfig(act_order=True))
    assert torch.equal(qw.scale, rtn.scale) and torch.equal(qw.zero, rtn.zero)  # from the original weights
    # Natural order: each weight is near its own dequantized value; in a permuted layout the
    # difference would be about twice the weights' power.
    assert (qw.dequantize() - W).pow(2).mean() < 0.25 * W.pow(2).mean()
    assert output_error(W, qw, X) < 0.8 * output_error(W, rtn, X)


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("scheme", SCHEMES.values(), ids=SCHEMES.keys())
def test_uncorrelated_inputs_give_rtn_codes_exactly(scheme, config):
    # Columns of a Hadamard matrix scaled by powers of two: X^T X is exactly diagonal, so the
    # Cholesky factor of H^-1 is diagonal, no error reaches another column, and every scale is
    # computed from untouched weights. Unequal column norms make act_order permute.
    g = torch.Generator().manual_seed(1)
    col_scale = 2.0 ** torch.randint(-2, 3, (256,), generator=g)
    X = hadamard(256) * col_scale
    W = torch.randn(128, 256, generator=g) * 0.02
    H = hessian(X)
    assert torch.count_nonzero(H - torch.diag(H.diagonal())) == 0
    rtn, qw = quantize_rtn(W, scheme), gptq_quantize(W, H, scheme, config)
    got, want = qw.tensors(), rtn.tensors()  # codes, scales and zero-points
    assert got.keys() == want.keys()
    assert all(torch.equal(got[name], want[name]) for name in want)


def reference_gptq(W, H, scheme, *, damp=0.01, order=None, static_groups=False):
    """OBQ one column at a time in float64, with the inverse Hessian updated explicitly.

    After quantizing column ``c`` to ``q``, every weight moves by ``-(w_c - q) / Hinv[c, c] * Hinv[c, :]``
    and ``c`` leaves the problem: ``Hinv -= Hinv[:, c] Hinv[c, :] / Hinv[c, c]`` zeroes its row and
    column, so quantized columns never move again. A group's scale comes from its weights when its
    first column is reached (from the original weights with ``static_groups``). Returns codes and
    dequantized weights ``[out, in]`` in the natural order.
    """
    fmt = scheme.number_format()
    out, n = W.shape
    group_len = n if scheme.granularity.value != "group" else scheme.group_size
    W = W.double().clone()
    H = H.double() + damp * H.diagonal().mean().double() * torch.eye(n, dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    original = W.clone()
    params, codes, Q = {}, torch.empty(out, n, dtype=torch.uint8), torch.empty(out, n)
    for c in order if order is not None else range(n):
        g = c // group_len
        if g not in params:
            source = original if static_groups else W
            cols = source[:, g * group_len:(g + 1) * group_len].float()
            if scheme.granularity.value == "tensor":
                cols = source.float().reshape(1, -1)
            lo, hi = observe_range(cols, scheme.observer, symmetric=scheme.symmetric,
                                   fake_quant=fake_quantizer(fmt, scheme), levels=2**scheme.bits)
            params[g] = qparams(lo, hi, fmt, scheme)
        scale, zero = params[g]
        codes[:, c] = quantize_rows(W[:, c:c + 1].float(), scale, zero, fmt, scheme)[:, 0]
        Q[:, c] = dequantize_rows(codes[:, c:c + 1], scale, zero, fmt, scheme)[:, 0]
        W -= ((W[:, c] - Q[:, c].double()) / Hinv[c, c])[:, None] * Hinv[c][None, :]
        Hinv -= Hinv[:, c:c + 1] @ Hinv[c:c + 1, :] / Hinv[c, c]
    return codes, Q


REFERENCE_CASES = {
    "int4-channel-b8": (QuantScheme(bits=4, granularity="channel"), GPTQConfig(block_size=8)),
    "int3-g16-asym-b8": (QuantScheme(bits=3, group_size=16, symmetric=False), GPTQConfig(block_size=8)),
    "int4-g16-asym-b5": (QuantScheme(bits=4, group_size=16, symmetric=False), GPTQConfig(block_size=5)),
    "nf4-g16-act-static-b8": (QuantScheme(format="nf4", group_size=16), GPTQConfig(block_size=8, act_order=True)),
    "int4-g16-act-dynamic-b8": (QuantScheme(bits=4, group_size=16),
                                GPTQConfig(block_size=8, act_order=True, static_groups=False)),
}


@pytest.mark.parametrize("scheme,config", REFERENCE_CASES.values(), ids=REFERENCE_CASES.keys())
def test_lazy_blocks_match_a_column_by_column_reference(scheme, config):
    W, X = correlated_layer(out=32, inp=64, samples=1024, seed=2)
    H = hessian(X)
    order = torch.argsort(H.diagonal(), descending=True, stable=True).tolist() if config.act_order else None
    codes, Q = reference_gptq(W, H, scheme, order=order, static_groups=config.act_order and config.static_groups)
    qw = gptq_quantize(W, H, scheme, config)
    # float32 against float64 may round a weight that sits on a grid midpoint the other way; the
    # lazy batching itself changes nothing beyond rounding.
    assert (qw.codes() == codes).float().mean() > 0.99  # all equal on x86 with MKL
    err_ref = ((W - Q) @ X.T).norm()
    assert abs(output_error(W, qw, X) - err_ref) < 0.005 * err_ref


def test_block_size_does_not_change_the_result(layer):
    W, X, H = layer
    scheme = QuantScheme(bits=4, group_size=32, symmetric=False)
    a = gptq_quantize(W, H, scheme, GPTQConfig(block_size=128))
    b = gptq_quantize(W, H, scheme, GPTQConfig(block_size=24))  # groups straddle blocks
    assert (a.codes() == b.codes()).float().mean() > 0.999
    torch.testing.assert_close(a.scales(), b.scales(), rtol=1e-3, atol=0)


def test_accumulate_hessian_is_the_mean_of_2_xtx_over_all_batches():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 10, 32, generator=g)
    H, n = None, 0
    for batch in (x[:1], x[1:4], x[4:]):  # uneven batches of [batch, seq, features]
        H, n = accumulate_hessian(H, batch, n)
    flat = x.reshape(-1, 32)
    assert n == 60
    torch.testing.assert_close(H, 2 * flat.T @ flat / 60)
    with pytest.raises(ValueError, match="activations have 16 features but the Hessian is"):
        accumulate_hessian(H, torch.randn(4, 16), n)


def test_deterministic(layer):
    W, X, H = layer
    scheme = QuantScheme(bits=3, group_size=32, symmetric=False)
    for config in CONFIGS.values():
        a, b = gptq_quantize(W, H, scheme, config), gptq_quantize(W.clone(), H.clone(), scheme, config)
        assert torch.equal(a.qdata, b.qdata) and torch.equal(a.scale, b.scale) and torch.equal(a.zero, b.zero)


def test_dead_and_rank_deficient_inputs_are_handled(recwarn):
    W, X = correlated_layer(out=64, inp=128, samples=96, seed=4)  # fewer samples than features
    X[:, [0, 5, 64, 127]] = 0.0  # inputs that never fire: their columns of H are zero
    H = hessian(X)
    H_before = H.clone()
    for scheme in (QuantScheme(bits=4, group_size=32), QuantScheme(bits=4, group_size=32, symmetric=False)):
        qw = gptq_quantize(W, H, scheme)
        deq = qw.dequantize()
        assert torch.isfinite(deq).all()
        assert torch.all(deq[:, [0, 5, 64, 127]] == 0)  # dead columns are zeroed, and 0 is on the grid
        assert output_error(W, qw, X) < output_error(W, quantize_rtn(W, scheme), X)
    assert torch.equal(H, H_before)  # the caller's Hessian is left alone
    assert not [w for w in recwarn if "positive definite" in str(w.message)]


def test_indefinite_hessian_retries_with_more_damping_then_raises():
    g = torch.Generator().manual_seed(5)
    W = torch.randn(16, 64, generator=g)
    v = torch.randn(64, generator=g)
    v /= v.norm()
    H = torch.eye(64) - 2 * torch.outer(v, v)  # eigenvalue -1: damp must reach 10 * mean diag
    scheme = QuantScheme(bits=4, granularity="channel")
    with pytest.warns(UserWarning, match="Hessian of mlp.up is not positive definite") as record:
        qw = gptq_quantize(W, H, scheme, layer="mlp.up")
    assert [str(w.message).split("; ")[1] for w in record] == [
        "retrying with damp=0.1", "retrying with damp=1", "retrying with damp=10"]
    assert record[0].filename == __file__  # the warning points at the caller
    assert torch.isfinite(qw.dequantize()).all()
    with pytest.raises(ValueError, match="Hessian of mlp.up stays singular after 1 dampening retries"):
        with pytest.warns(UserWarning):
            gptq_quantize(W, H, scheme, GPTQConfig(max_damp_retries=1), layer="mlp.up")


def test_bad_inputs_are_named():
    W, X = correlated_layer(out=16, inp=64, samples=256)
    H = hessian(X)
    bad_H = H.clone()
    bad_H[3, 7] = float("nan")
    with pytest.raises(ValueError, match="Hessian of layers.0.q_proj has 1 NaN/Inf values"):
        gptq_quantize(W, bad_H, QuantScheme(), layer="layers.0.q_proj")
    bad_W = W.clone()
    bad_W[1, 2] = float("inf")
    with pytest.raises(ValueError, match="layers.0.q_proj has 1 NaN/Inf"):
        gptq_quantize(bad_W, H, QuantScheme(), layer="layers.0.q_proj")
    with pytest.raises(ValueError, match="group size 48 does not divide in_features=64 of layers.0.q_proj"):
        gptq_quantize(W, H, QuantScheme(group_size=48), layer="layers.0.q_proj")
    with pytest.raises(ValueError, match=r"must be \[64, 64\]"):
        gptq_quantize(W, H[:32, :32], QuantScheme())
    for bad in ({"damp": 0.0}, {"block_size": 0}, {"max_damp_retries": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            GPTQConfig(**bad)


@pytest.mark.parametrize("scheme", [SCHEMES["int4-channel"], SCHEMES["int3-g64-asym"], SCHEMES["nf4-g64-dq"],
                                    SCHEMES["int4-tensor"]], ids=["int4-channel", "int3-g64-asym", "nf4-g64-dq",
                                                                  "int4-tensor"])
def test_shared_hessian_solve_gives_each_layer_its_own_result(layer, scheme):
    """q/k/v share one column loop; each row's codes are those of a separate solve (per-tensor
    scales are whole-weight statistics, so that granularity is solved weight by weight)."""
    W, _, H = layer
    parts = [W[:48], W[48:64] * 3, W[64:]]
    shared = gptq_quantize_shared(parts, H, scheme, layers=["q", "k", "v"])
    for part, qw in zip(parts, shared):
        alone = gptq_quantize(part, H, scheme)
        assert qw.shape == alone.shape
        assert (qw.codes() != alone.codes()).float().mean() < 0.002  # float summation order only
        assert torch.allclose(qw.scales(), alone.scales())


def test_shared_solve_refuses_mismatched_inputs(layer):
    W, _, H = layer
    with pytest.raises(ValueError, match=r"k: expected a 2-D weight \[out, 256\]"):
        gptq_quantize_shared([W, W[:, :128]], H, SCHEMES["int4-channel"], layers=["q", "k"])


# --- the column loop ------------------------------------------------------------------------------

def test_scalar_and_gguf_gptq_run_the_one_column_loop(monkeypatch):
    """Both grids go through ``gptq_column_loop``; only their ``ColumnQuantizer`` differs."""
    from gguf import GGMLQuantizationType

    from lowbit.gguf import gptq_blocks
    from lowbit.methods import gptq

    loop = gptq.gptq_column_loop
    assert gptq_blocks.gptq_column_loop is loop
    quantizers = []

    def spy(W, Hinv, block_size, quantize_column):
        quantizers.append(type(quantize_column).__name__)
        return loop(W, Hinv, block_size, quantize_column)

    monkeypatch.setattr(gptq, "gptq_column_loop", spy)
    monkeypatch.setattr(gptq_blocks, "gptq_column_loop", spy)
    g = torch.Generator().manual_seed(0)
    W, X = torch.randn(32, 256, generator=g), torch.randn(512, 256, generator=g)
    H = 2 * X.T @ X / len(X)
    gptq.gptq_quantize(W, H, QuantScheme(bits=4, group_size=64))
    gptq_blocks.gptq_quantize_rows(W, H, GGMLQuantizationType.Q4_0)
    assert quantizers == ["_GridColumns", "_BlockColumns"]


class _FittedBlocks:
    """A ``ColumnQuantizer`` whose grid is fitted to the current values of 8 columns at a time (as a
    GGUF block's): per row, a scale from their largest magnitude, 7 levels each side."""

    def __init__(self) -> None:
        self.scale = None

    def __call__(self, j, w, current):
        if j % 8 == 0:
            self.scale = current(slice(j, j + 8)).abs().amax(1).clamp_min(1e-8) / 7
        return torch.round(w / self.scale).clamp_(-7, 7) * self.scale


@pytest.mark.parametrize("block_size", [1, 5, 8, 64])
def test_column_loop_lazy_batches_change_nothing_but_speed(block_size):
    """``current`` gives a grid the error-updated values of later columns, also across a lazy batch
    (a block size of 5 splits the 8-column fits), so the result is the eager loop's."""
    from lowbit.methods.gptq import GPTQConfig, gptq_column_loop, inverse_hessian_factor

    g = torch.Generator().manual_seed(1)
    W, X = torch.randn(16, 64, generator=g), torch.randn(256, 64, generator=g) @ torch.randn(64, 64, generator=g)
    Hinv = inverse_hessian_factor(2 * X.T @ X / len(X), GPTQConfig(), "w")

    def quantized(width):
        Q, quantize = W.clone(), _FittedBlocks()
        values = torch.empty_like(W)

        def keep(j, w, current):
            values[:, j] = quantize(j, w, current)
            return values[:, j]

        gptq_column_loop(Q, Hinv, width, keep)
        return values

    torch.testing.assert_close(quantized(block_size), quantized(64 * 64), rtol=1e-4, atol=1e-4)


def test_inverse_factor_in_place_equals_the_out_of_place_recipe_and_leaves_h_alone():
    """The permuted copy, the damping and both factorizations run in two buffers; every bit equals
    IST's ``H[perm][:, perm]``, clone, ``cholesky``, ``cholesky_inverse``, ``cholesky(upper)``."""
    from lowbit.methods.gptq import inverse_hessian_factor

    g = torch.Generator().manual_seed(3)
    X = torch.randn(1024, 512, generator=g) * torch.rand(512, generator=g)
    X[:, 7] = 0.0  # an input never seen: its diagonal entry becomes 1
    H = 2 * X.T @ X / len(X)
    H[3, 5] += 1e-3  # not exactly symmetric, as addmm sums can leave it: only the lower triangle counts
    before = H.clone()
    diag = H.diagonal().masked_fill(H.diagonal() == 0, 1.0)
    perm = torch.argsort(diag, descending=True, stable=True)

    Hp = H[perm][:, perm]
    Hp.diagonal().masked_fill_(Hp.diagonal() == 0, 1.0)
    Hd = Hp.clone()
    Hd.diagonal().add_(0.01 * Hp.diagonal().mean())
    L, _ = torch.linalg.cholesky_ex(Hd)
    expected, _ = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)

    got = inverse_hessian_factor(H, GPTQConfig(damp=0.01), "w", perm=perm)
    assert torch.equal(got, expected)
    assert torch.equal(H, before)
    assert not torch.equal(inverse_hessian_factor(H, GPTQConfig(damp=0.01), "w"), expected)  # perm is applied


def _resident_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field)) / 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's peak-RSS reset (/proc)")
def test_inverse_factor_holds_two_buffers_beside_h():
    """The 2 GiB target for an 8960-wide down_proj rests on this: besides H, the factor's peak is two
    [n, n] buffers (and a few columns); the out-of-place recipe measured six."""
    from lowbit.methods.gptq import inverse_hessian_factor

    n = 2048
    X = torch.randn(n + 256, n, generator=torch.Generator().manual_seed(0))
    H = X.T @ X / len(X)
    del X
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    inverse_hessian_factor(H[:64, :64], GPTQConfig(), "w", perm=perm[perm < 64])  # LAPACK's code paged in
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # peak RSS := current RSS
    before = _resident_mib("VmRSS")
    Hinv = inverse_hessian_factor(H, GPTQConfig(), "w", perm=perm)
    grown = _resident_mib("VmHWM") - before
    assert grown < 3 * H.numel() * 4 / 2**20, f"{grown:.0f} MiB for {H.numel() * 4 / 2**20:.0f} MiB matrices"
    assert Hinv.shape == (n, n)

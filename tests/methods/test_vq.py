"""Vector and product quantization (GPTVQ): codebook layout, error feedback, refinement, checkpoints,
the command line, and a real layer against RTN and GPTQ at no more bits per weight."""

from __future__ import annotations

import json

import pytest
import torch

from lowbit.api import load, quantize
from lowbit.cli import main
from lowbit.io.checkpoint import load_quantized, save_quantized
from lowbit.methods import get_method
from lowbit.methods.vq import VQConfig, gptvq_quantize
from lowbit.pipeline.recipe import Recipe
from lowbit.scheme import QuantScheme

VQ = QuantScheme(format="vq", bits=8, vector_dim=4, granularity="tensor")
PQ = QuantScheme(format="vq", bits=6, vector_dim=2, granularity="group", group_size=64, shared_codebook=True)
PER_ROW = QuantScheme(format="vq", bits=3, vector_dim=2, granularity="channel")


def _layer(out: int = 256, n: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight and the Hessian of correlated inputs (dimensions multiples of 256)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2048, n, generator=g) @ (torch.eye(n) + 0.2 * torch.randn(n, n, generator=g) / n**0.5)
    x[:, 3] = 0.0  # a column that never sees input
    return 0.05 * torch.randn(out, n, generator=g), 2 * x.T @ x / x.shape[0]


def _output_error(W: torch.Tensor, H: torch.Tensor, qw) -> float:
    dW = qw.dequantize() - W
    return float(((dW @ H) * dW).sum())


@pytest.mark.parametrize("scheme", [VQ, PQ, PER_ROW], ids=lambda s: s.describe())
def test_dequantize_is_the_codebook_gather(scheme):
    W, H = _layer()
    qw = gptvq_quantize(W, H, scheme, VQConfig(kmeans_iterations=3, refine_iterations=3))
    codes, books, d = qw.codes().long(), qw.codebook.float(), scheme.vector_dim
    out, m = codes.shape
    expect = torch.empty(out, m * d)
    for r in range(out):  # written out: vector p of row r is entry codes[r, p] of its codebook
        for p in range(m):
            if scheme.shared_codebook:
                book = p * d // scheme.group_size
            elif scheme.granularity.value == "channel":
                book = r
            else:
                book = 0
            expect[r, p * d:(p + 1) * d] = books[book, codes[r, p]]
    assert torch.equal(qw.dequantize(), expect)
    assert qw.storage_bits() == out * m * scheme.bits + books.numel() * 16  # codes and float16 codebooks count


def test_error_feedback_and_refinement_each_lower_the_output_error():
    W, H = _layer(seed=1)
    plain = VQConfig(refine_iterations=0)
    no_feedback = gptvq_quantize(W, torch.diag(H.diagonal()), VQ, plain)  # a diagonal H: nothing to feed back
    feedback = gptvq_quantize(W, H, VQ, plain)
    refined = gptvq_quantize(W, H, VQ, VQConfig())
    errors = [_output_error(W, H, q) for q in (no_feedback, feedback, refined)]
    assert errors[1] < errors[0] and errors[2] <= errors[1], errors
    assert torch.equal(feedback.codes(), refined.codes())  # refinement moves codebook values only


def test_deterministic_for_a_seed():
    W, H = _layer(seed=2)
    a, b = (gptvq_quantize(W, H, PQ, VQConfig(seed=5)) for _ in range(2))
    assert all(torch.equal(a.tensors()[k], b.tensors()[k]) for k in a.tensors())


def test_shapes_that_do_not_fit_are_refused():
    W, H = _layer(out=256, n=256)
    with pytest.raises(ValueError, match="larger than the 128 weight vectors"):
        gptvq_quantize(W, H, QuantScheme(format="vq", bits=8, vector_dim=2, granularity="channel"))
    with pytest.raises(ValueError, match="vector_dim 3 does not divide in_features=256"):
        gptvq_quantize(W, H, QuantScheme(format="vq", bits=4, vector_dim=3, granularity="tensor"))
    with pytest.raises(ValueError, match="method pq needs shared_codebook"):
        get_method("pq").quantize(W, VQ, statistics={"hessian": H})
    with pytest.raises(ValueError, match="produces vq codebooks"):
        get_method("vq").quantize(W, QuantScheme(bits=2), statistics={"hessian": H})


@pytest.mark.parametrize("method, scheme", [
    ("vq", QuantScheme(format="vq", bits=4, vector_dim=2, granularity="tensor")),
    ("pq", QuantScheme(format="vq", bits=4, vector_dim=2, granularity="group", group_size=128, shared_codebook=True)),
], ids=["vq", "pq"])
def test_checkpoint_round_trip_is_bit_identical(tiny_llama_dir, tmp_path, method, scheme):
    model, _ = load(str(tiny_llama_dir))
    recipe = Recipe(method=method, default=scheme, method_config=VQConfig(kmeans_iterations=3, refine_iterations=3))
    calib = torch.randint(0, model.config.vocab_size, (8, 64), generator=torch.Generator().manual_seed(0))
    quantize(model, recipe, calibration=calib, progress=False)
    save_quantized(model, tmp_path / "q", recipe=recipe)
    loaded, _ = load_quantized(tmp_path / "q")
    ids = calib[:2, :16]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    for name, buf in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], buf), name


def test_command_line_vq_and_info_show_codebooks(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_llama_dir), "-o", str(out), "--method", "pq", "--vq-dim", "2",
                 "--codebook-bits", "4", "--group-size", "128", "--calib-samples", "8", "--calib-seqlen", "64",
                 "--quiet"]) == 0
    assert "vq4 d2 pq g128" in capsys.readouterr().out
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    q_proj = next(row for row in info["layers"] if row["name"].endswith("layers.0.self_attn.q_proj"))
    assert q_proj["codebook_shape"] == [2, 16, 2] and q_proj["bpw"] == 2 + q_proj["codebook_bpw"]
    assert main(["info", str(out)]) == 0
    assert "codebook 2x16x2" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--method", "vq", "--vq-dim", "3"], "vector_dim 3 does not divide in_features=256"),
    (["--method", "vq", "--vq-dim", "2", "--codebook-bits", "8", "--per-channel"], "larger than the 128"),
    (["--method", "vq", "--codebook-bits", "9"], "1 to 8 bits per code"),
    (["--method", "gptq", "--vq-dim", "4"], "--vq-dim set the codebooks of --method vq or pq"),
    (["--method", "pq", "--per-channel"], "drop --per-channel"),
])
def test_codebooks_that_do_not_fit_are_one_line_and_exit_2(tiny_llama_dir, tmp_path, capsys, args, message):
    assert main(["quantize", str(tiny_llama_dir), "-o", str(tmp_path / "q"), *args, "--calib-samples", "8",
                 "--calib-seqlen", "64", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "q").exists()


@pytest.mark.real_model
@pytest.mark.parametrize("vq, rtn, beats_gptq", [
    (QuantScheme(format="vq", bits=8, vector_dim=4, granularity="tensor"),
     QuantScheme(bits=2, group_size=32, symmetric=False), False),
    (QuantScheme(format="vq", bits=8, vector_dim=4, granularity="group", group_size=64, shared_codebook=True),
     QuantScheme(bits=2, group_size=32, symmetric=False), True),
    (QuantScheme(format="vq", bits=6, vector_dim=2, granularity="group", group_size=64, shared_codebook=True),
     QuantScheme(bits=3, group_size=64, symmetric=False), False),
], ids=["vq8-d4", "pq8-d4-g64", "pq6-d2-g64"])
def test_beats_rtn_at_no_more_bits_on_a_real_layer(real_layer, vq, rtn, beats_gptq):
    """SmolLM2's layers.1.self_attn.q_proj: ``tr(dW H dW^T)`` on its calibration inputs. Product
    quantization at 2 bits per weight is also below GPTQ's int2 g32 (one codebook for the whole layer
    is not, on these 1024 calibration tokens; at 3 bits GPTQ's int3 g64, 0.28 bits more, is about equal)."""
    W, stats = real_layer
    H = stats["hessian"]
    ours = get_method("pq" if vq.shared_codebook else "vq").quantize(W, vq, statistics=stats)
    base = get_method("rtn").quantize(W, rtn)
    assert ours.bits_per_weight <= base.bits_per_weight
    assert _output_error(W, H, ours) < 0.5 * _output_error(W, H, base)
    if beats_gptq:
        assert _output_error(W, H, ours) < _output_error(W, H, get_method("gptq").quantize(W, rtn, statistics=stats))


from tests.methods.test_tables import real_layer  # noqa: E402,F401  (the shared SmolLM2 layer fixture)

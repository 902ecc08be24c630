"""The ONNX exporter: onnxruntime runs the exported tiny Llama to lowbit's own logits, the KV cache gives
the full-sequence logits, MatMulNBits' layout decodes (by its published formula) to lowbit's weights, and
what the graph cannot hold is refused with one line and no output."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import lowbit
from lowbit.cli import main

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from lowbit.onnx.linear import dequant_tensors, nbits_tensors  # noqa: E402
from lowbit.onnx.runtime import OnnxCausalLM  # noqa: E402
from lowbit.onnx.schemes import nbits_block  # noqa: E402

# float32 logits of the same weights, summed in another order by onnxruntime (measured ~1e-6)
LOGIT_TOLERANCE = 1e-4
SCHEMES = {
    "int4 g64 asym": dict(bits=4, group_size=64, symmetric=False),  # MatMulNBits with zero-points
    "int4 g32": dict(bits=4, group_size=32),  # MatMulNBits' default zero point 8
    "int4 per-channel asym": dict(bits=4, granularity="channel", symmetric=False),  # scales repeated over blocks
    "int4 g64 dq": dict(bits=4, group_size=64, double_quant=True),  # 8-bit scales decoded to float32
    "int8 per-channel": dict(bits=8, granularity="channel"),  # 8-bit MatMulNBits
    "int8 per-tensor asym": dict(bits=8, granularity="tensor", symmetric=False),
    "int8 g8": dict(bits=8, group_size=8),  # no MatMulNBits block: DequantizeLinear + MatMul
}


def _tiny(tied: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512, max_position_embeddings=256,
                         tie_word_embeddings=tied)
    return LlamaForCausalLM(config).eval()


def _quantized(scheme: dict, head: dict | None = None, tied: bool = False):
    model = _tiny(tied)
    overrides = (lowbit.Override(r"^lm_head$", lowbit.QuantScheme(**head)),) if head else ()
    recipe = lowbit.Recipe(default=lowbit.QuantScheme(**scheme), overrides=overrides, skip=() if head else ("lm_head",))
    lowbit.quantize(model, recipe, progress=False)
    return model


def _ids(batch: int = 2, length: int = 24) -> torch.Tensor:
    return torch.randint(0, 512, (batch, length), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", list(SCHEMES))
def test_onnxruntime_computes_lowbits_logits(name, tmp_path):
    model = _quantized(SCHEMES[name])
    lowbit.export(model, None, tmp_path / "m", to="onnx")
    ids = _ids()
    with torch.no_grad():
        expected = model(ids).logits
    got = OnnxCausalLM(tmp_path / "m")(ids)
    assert (got - expected).abs().max() < LOGIT_TOLERANCE


@pytest.mark.parametrize("head", [dict(bits=4, group_size=64, symmetric=False), dict(bits=8, granularity="channel"),
                                  dict(bits=8, group_size=8, symmetric=False)])
def test_a_tied_quantized_head_is_stored_once_and_embeds_from_its_codes(head, tmp_path):
    import onnx

    model = _quantized(SCHEMES["int4 g64 asym"], head=head, tied=True)
    report = lowbit.export(model, None, tmp_path / "m", to="onnx")
    ids = _ids()
    with torch.no_grad():
        expected = model(ids).logits
    assert (OnnxCausalLM(tmp_path / "m")(ids) - expected).abs().max() < LOGIT_TOLERANCE
    graph = onnx.load(str(tmp_path / "m" / "model.onnx"), load_external_data=False).graph
    assert not any(i.name == "model.embed_tokens.weight" for i in graph.initializer)
    assert report.float_layers == 0


def test_the_kv_cache_gives_the_full_sequence_logits_and_greedy_tokens(tmp_path):
    model = _quantized(SCHEMES["int4 g64 asym"], head=dict(bits=8, granularity="channel"), tied=True)
    lowbit.export(model, None, tmp_path / "m", to="onnx")
    lm = OnnxCausalLM(tmp_path / "m")
    ids = _ids(length=20)
    full = lm(ids).numpy()
    logits, past = lm.step(ids[:, :12].numpy(), lm.empty_cache(2))
    pieces = [logits]
    for t in range(12, 20):
        logits, past = lm.step(ids[:, t:t + 1].numpy(), past)
        pieces.append(logits)
    assert past["past_key_values.1.value"].shape == (2, 2, 20, 64)
    assert np.abs(np.concatenate(pieces, axis=1) - full).max() < LOGIT_TOLERANCE
    prompt = ids[0, :8].tolist()
    tokens = lm.generate(prompt, 6)
    with torch.no_grad():
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False)[0, 8:].tolist()
    assert tokens == expected


@pytest.mark.parametrize("name", list(SCHEMES))
def test_packing_decodes_by_the_operators_formula_to_lowbits_weight(name):
    """MatMulNBits: B[n, k // block, (k % block) * bits / 8] holds code k of row n (low nibble first at 4
    bits), w = (code - zero) * scale with zero 2**(bits-1) when absent (the contrib op's documentation);
    DequantizeLinear: w^T = (codes - zero) * scale blocked along axis 0. Both must give ``dequantize()``."""
    qw = _quantized(SCHEMES[name]).model.layers[0].mlp.down_proj.quantized_weight()
    N, K = qw.shape
    if nbits_block(qw.scheme, K) is not None:
        t = nbits_tensors(qw)
        assert t.B.tobytes() == qw.qdata.numpy().tobytes()  # lowbit's bytes, not re-packed
        flat = t.B.reshape(N, -1)
        codes = np.stack([flat & 15, flat >> 4], -1).reshape(N, K) if t.bits == 4 else flat
        blocks = K // t.block
        if t.zero_points is None:
            zero = np.full((N, blocks), 2.0 ** (t.bits - 1))
        else:
            zp = t.zero_points.reshape(N, -1)
            zero = (np.stack([zp & 15, zp >> 4], -1).reshape(N, -1) if t.bits == 4 else zp)[:, :blocks]
        w = (codes.reshape(N, blocks, t.block).astype(np.float32) - zero[..., None].astype(np.float32)) * \
            t.scales.reshape(N, blocks, 1)
    else:  # DequantizeLinear of the transposed codes [K, N], scales [K / group, N] blocked along axis 0
        t = dequant_tensors(qw)
        rows = lambda a: np.repeat(a.astype(np.float32), t.block_size, axis=0)  # noqa: E731
        zero = 0 if t.zero_point is None else rows(t.zero_point)
        w = ((t.codes.astype(np.float32) - zero) * rows(t.scale)).T
    assert np.array_equal(np.asarray(w, dtype=np.float32).reshape(N, K), qw.dequantize().numpy())


def test_the_export_is_deterministic_and_records_source_and_licence(tmp_path):
    import onnx

    model = _quantized(SCHEMES["int4 g64 asym"])
    model.config.license = "apache-2.0"
    model.config._name_or_path = "HuggingFaceTB/SmolLM2-135M"
    lowbit.export(model, None, tmp_path / "a", to="onnx")
    lowbit.export(model, None, tmp_path / "b", to="onnx")
    for name in ("model.onnx", "model.onnx.data", "lowbit_onnx.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    proto = onnx.load(str(tmp_path / "a" / "model.onnx"), load_external_data=False)
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["license"] == "apache-2.0" and props["source_model"] == "HuggingFaceTB/SmolLM2-135M"
    record = json.loads((tmp_path / "a" / "lowbit_onnx.json").read_text())
    assert record["layers"]["model.layers.0.mlp.down_proj"] == "int4 g64 asym"


@pytest.mark.parametrize("scheme,message", [
    (dict(format="nf4", group_size=64), "nf4 codes are not an integer grid"),
    (dict(bits=4, group_size=64, symmetric=False, zero_point="float"), "a float minimum (w = s q + m)"),
    (dict(bits=3, group_size=64), "int3: only 4-bit and 8-bit codes"),
    (dict(bits=4, group_size=8), "MatMulNBits blocks are 16, 32, 64, 128 or 256 weights"),
])
def test_a_scheme_without_an_operator_is_refused_before_writing(scheme, message, tmp_path):
    model = _quantized(scheme)
    with pytest.raises(ValueError, match="onnx cannot write model.layers.0.self_attn.q_proj") as error:
        lowbit.export(model, None, tmp_path / "m", to="onnx")
    assert message in str(error.value) and "\n" not in str(error.value)
    assert list(tmp_path.iterdir()) == []


def test_cli_refusals_are_one_line_with_no_output(tiny_llama_dir, tmp_path, capsys):
    ckpt = tmp_path / "nf4"
    model, tokenizer = lowbit.load(str(tiny_llama_dir))
    recipe = lowbit.Recipe(default=lowbit.QuantScheme(format="nf4", group_size=64))
    lowbit.quantize(model, recipe, progress=False)
    lowbit.save_quantized(model, ckpt, recipe=recipe, tokenizer=tokenizer)
    out = tmp_path / "out"
    assert main(["export", str(ckpt), "--to", "onnx", "-o", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert "onnx cannot write model.layers.0.self_attn.q_proj (nf4 g64): nf4 codes" in err.splitlines()[-1]
    assert main(["export", str(tiny_llama_dir), "--to", "onnx", "-o", str(out), "--accuracy-level", "9"]) == 2
    assert "accuracy_level must be one of 0, 1, 2, 3, 4, got '9'" in capsys.readouterr().err
    model.config.model_type = "gpt2"
    with pytest.raises(ValueError, match="onnx export maps Llama-family models only: architecture 'gpt2'"):
        lowbit.export(model, None, out, to="onnx")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["nf4"]


def test_cli_export_writes_a_directory_onnxruntime_loads_with_its_tokenizer(tiny_llama_dir, tmp_path, capsys):
    ckpt = tmp_path / "int4"
    model, tokenizer = lowbit.load(str(tiny_llama_dir))
    recipe = lowbit.Recipe(default=lowbit.QuantScheme(bits=4, group_size=64, symmetric=False))
    lowbit.quantize(model, recipe, progress=False)
    lowbit.save_quantized(model, ckpt, recipe=recipe, tokenizer=tokenizer)
    out = tmp_path / "onnx"
    assert main(["export", str(ckpt), "--to", "onnx", "-o", str(out), "--accuracy-level", "4", "--json",
                 "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["matmulnbits_layers"] == 14 and report["float_layers"] == 1 and report["accuracy_level"] == 4
    assert (out / "tokenizer.json").is_file()
    ids = _ids()
    with torch.no_grad():
        expected = lowbit.load(ckpt)[0](ids).logits
    got = OnnxCausalLM(out)(ids)  # int8 activations: close, not equal
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()
    assert main(["export", str(ckpt), "--to", "onnx", "-o", str(out), "--quiet", "--overwrite"]) == 0  # lowbit's own

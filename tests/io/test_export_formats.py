"""GPTQ, AWQ and compressed-tensors layouts against their published packing (reimplemented here from the
reference code, independent of ``lowbit.formats.pack``), lossless round trips through lowbit's readers,
refusals in one line with no output, and the model card with the source's licence in every directory."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import lowbit
from lowbit.act_scheme import ActScheme
from lowbit.cli import main
from lowbit.io.export.compressed_tensors import ct_tensors
from lowbit.io.gptq_layout import AWQ_ORDER, awq_tensors, awq_weight, gptq_tensors, gptq_weight
from lowbit.io.model_card import ModelCard, ModelOrigin, origin_of, read_front_matter, render_model_card
from lowbit.nn import QuantLinear, quantized_layers
from lowbit.qweight import QuantizedWeight
from lowbit.scheme import QuantScheme


def _weight(scheme: QuantScheme, shape=(64, 256), seed=0) -> QuantizedWeight:
    g = torch.Generator().manual_seed(seed)
    out_features, in_features = shape
    R, G = (out_features, 1) if scheme.group_size is None else (out_features, in_features // scheme.group_size)
    codes = torch.randint(0, 2**scheme.bits, shape, generator=g).to(torch.uint8)
    scale = torch.rand(R, G, generator=g) + 0.01
    zero = None if scheme.symmetric else torch.randint(1, 2**scheme.bits, (R, G), generator=g).float()
    return QuantizedWeight.from_codes(codes, scale, zero, scheme)


def _reference_gptq_unpack(words: torch.Tensor, bits: int, n: int, dim: int) -> torch.Tensor:
    """GPTQ's published unpacking (AutoGPTQ ``dequantize``): ``32 / bits`` codes per int32, LSB first; 3 bits
    as one little-endian 96-bit stream per 3 words. Codes along ``dim``."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    if dim == 0:
        w = w.t()
    rows = w.shape[0]
    if bits == 3:
        w = w.reshape(rows, -1, 3)
        codes = []
        for k in range(32):
            start = 3 * k
            word, off = divmod(start, 32)
            v = w[..., word] >> off
            if off > 29:
                v = v | (w[..., word + 1] << (32 - off))
            codes.append(v & 7)
        out = torch.stack(codes, -1).reshape(rows, -1)
    else:
        per = 32 // bits
        out = ((w.unsqueeze(-1) >> (torch.arange(per) * bits)) & (2**bits - 1)).reshape(rows, -1)
    out = out[:, :n]
    return out.t() if dim == 0 else out


@pytest.mark.parametrize("scheme", [QuantScheme(bits=4, group_size=64), QuantScheme(bits=4, group_size=64, symmetric=False),
                                    QuantScheme(bits=3, group_size=64, symmetric=False), QuantScheme(bits=2, group_size=32),
                                    QuantScheme(bits=8, granularity="channel")])
def test_gptq_packing_is_the_published_layout_and_reads_back_exactly(scheme):
    qw = _weight(scheme)
    t = gptq_tensors(qw)
    out_features, in_features = qw.shape
    codes = _reference_gptq_unpack(t["qweight"], scheme.bits, in_features, dim=0)  # [in, out]
    assert torch.equal(codes.t().to(torch.uint8), qw.codes())
    zeros = _reference_gptq_unpack(t["qzeros"], scheme.bits, out_features, dim=1) + 1  # v1 stores zero - 1
    expected_zero = qw.zeros() if qw.zeros() is not None else torch.full(qw.layout.rows, 2.0 ** (scheme.bits - 1))
    assert torch.equal(zeros.t().float(), expected_zero)
    assert t["scales"].dtype == torch.float16 and torch.equal(t["scales"].t(), qw.scale)
    W = t["scales"].float()[t["g_idx"].long()] * (codes.float() - zeros.float()[t["g_idx"].long()])
    assert torch.equal(W.t(), qw.dequantize())
    back = gptq_weight(t, scheme.bits, scheme.group_size or -1, scheme.symmetric, qw.shape)
    assert back.scheme == scheme and all(torch.equal(back.data[k], qw.data[k]) for k in qw.data)


def test_gptq_act_order_g_idx_and_v2_zero_points():
    scheme = QuantScheme(bits=4, group_size=64, symmetric=False, group_index=True)
    base = _weight(QuantScheme(bits=4, group_size=64, symmetric=False))
    g_idx = torch.randperm(256, generator=torch.Generator().manual_seed(1)).to(torch.int32) // 64
    qw = QuantizedWeight.from_tensors(scheme, base.shape, {**base.data, "g_idx": g_idx})
    back = gptq_weight(gptq_tensors(qw), 4, 64, False, qw.shape)
    assert back.scheme.group_index and torch.equal(back.dequantize(), qw.dequantize())
    zero = _weight(QuantScheme(bits=4, group_size=64, symmetric=False))
    zero.data["zero"] = torch.zeros_like(zero.data["zero"])  # a zero-point of 0: no v1 encoding
    with pytest.raises(ValueError, match="zero-point of 0.*--gptq-v2"):
        gptq_tensors(zero, "L")
    v2 = gptq_tensors(zero, "L", v2=True)
    assert torch.equal(gptq_weight(v2, 4, 64, False, zero.shape, v2=True).dequantize(), zero.dequantize())


def _int32(words: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit words held in int64 as the int32 tensors the formats store."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _reference_awq_pack(intweight: torch.Tensor) -> torch.Tensor:
    """AutoAWQ ``WQLinear_GEMM.from_linear``'s packing of ``[rows, out]`` 4-bit values, column order map."""
    packed = torch.zeros(intweight.shape[0], intweight.shape[1] // 8, dtype=torch.int64)
    for col in range(intweight.shape[1] // 8):
        for i in range(8):
            packed[:, col] |= intweight[:, col * 8 + AWQ_ORDER[i]].to(torch.int64) << (i * 4)
    return _int32(packed)


@pytest.mark.parametrize("symmetric", [True, False])
def test_awq_gemm_packing_is_autoawq_layout(symmetric):
    qw = _weight(QuantScheme(bits=4, group_size=64, symmetric=symmetric))
    t = awq_tensors(qw)
    assert torch.equal(t["qweight"], _reference_awq_pack(qw.codes().t()))
    zeros = qw.zeros() if not symmetric else torch.full(qw.layout.rows, 8.0)
    assert torch.equal(t["qzeros"], _reference_awq_pack(zeros.t().to(torch.uint8)))
    back = awq_weight(t, 64, qw.shape)
    assert back.scheme.symmetric == symmetric and torch.equal(back.dequantize(), qw.dequantize())
    with pytest.raises(ValueError, match="no AWQ form"):
        awq_tensors(_weight(QuantScheme(bits=4, granularity="channel")), "L")


def _reference_ct_pack(value: torch.Tensor, bits: int) -> torch.Tensor:
    """compressed-tensors 0.19 ``pack_to_int32`` (rows of int8 values ``q``, stored ``q + 2**(bits-1)``,
    element i at bit ``i * bits`` of each row's stream of 32-bit words)."""
    u = (value.to(torch.int64) + (1 << (bits - 1)))
    rows, cols = u.shape
    words = torch.zeros(rows, -(-cols * bits // 32), dtype=torch.int64)
    for i in range(cols):
        word, off = divmod(i * bits, 32)
        words[:, word] |= (u[:, i] << off) & 0xFFFFFFFF
        if off + bits > 32:
            words[:, word + 1] |= u[:, i] >> (32 - off)
    return _int32(words)


@pytest.mark.parametrize("scheme", [QuantScheme(bits=4, group_size=64), QuantScheme(bits=4, group_size=64, symmetric=False),
                                    QuantScheme(bits=3, group_size=64), QuantScheme(bits=8, granularity="channel")])
def test_compressed_tensors_pack_quantized_is_the_published_layout(scheme):
    qw = _weight(scheme)
    layer = QuantLinear.from_quantized(qw)
    t = ct_tensors(layer, torch.float32)
    q = qw.codes().to(torch.int64) - 2 ** (scheme.bits - 1)  # compressed-tensors' signed values
    assert torch.equal(t["weight_packed"], _reference_ct_pack(q, scheme.bits))
    assert t["weight_shape"].tolist() == list(qw.shape)
    zp = torch.zeros(qw.layout.rows) if scheme.symmetric else qw.zeros() - 2 ** (scheme.bits - 1)
    if not scheme.symmetric:  # packed along the output dimension
        assert torch.equal(t["weight_zero_point"], _reference_ct_pack(zp.to(torch.int64).t(), scheme.bits).t())
    g = scheme.group_size or qw.shape[1]
    W = (q.float() - zp.repeat_interleave(g, -1)) * t["weight_scale"].repeat_interleave(g, -1)
    assert torch.equal(W, qw.dequantize())


@pytest.fixture(scope="module")
def licensed_source(tiny_llama_dir, tmp_path_factory):
    """The tiny model with a Hugging Face card naming its licence."""
    import shutil

    src = tmp_path_factory.mktemp("src") / "licensed"
    shutil.copytree(tiny_llama_dir, src)
    (src / "README.md").write_text("---\nlicense: other\nlicense_name: tiny-licence\nbase_model: test/tiny\n---\n# x\n")
    return src


def _quantized(src, tmp_path, recipe):
    model, tokenizer = lowbit.load(str(src))
    lowbit.quantize(model, recipe, progress=False)
    out = tmp_path / "ckpt"
    lowbit.save_quantized(model, out, recipe=recipe, tokenizer=tokenizer)
    return out


@pytest.mark.parametrize("to,scheme,act", [
    ("gptq", QuantScheme(bits=4, group_size=64), None),
    ("awq", QuantScheme(bits=4, group_size=64, symmetric=False), None),
    ("compressed-tensors", QuantScheme(bits=4, group_size=64, symmetric=False), None),
    ("compressed-tensors", QuantScheme(bits=8, granularity="channel"), ActScheme()),
    ("compressed-tensors", QuantScheme(format="fp8_e4m3", bits=8, granularity="channel"),
     ActScheme(format="fp8_e4m3")),
])
def test_export_reads_back_as_the_same_codes_with_card_and_licence(to, scheme, act, licensed_source, tmp_path,
                                                                  monkeypatch):
    ckpt = _quantized(licensed_source, tmp_path, lowbit.Recipe(default=scheme, activations=act))
    out = tmp_path / "out"
    monkeypatch.setattr("sys.argv", ["/usr/bin/lowbit", "export", str(ckpt), "--to", to])  # the card's command
    assert main(["export", str(ckpt), "--to", to, "-o", str(out), "--quiet"]) == 0
    before = {n: m.quantized_weight() for n, m in quantized_layers(lowbit.load(ckpt)[0]).items()}
    model, _ = lowbit.load(out)
    after = quantized_layers(model)
    assert before.keys() == after.keys() and len(after) == 14
    for name, qw in before.items():
        got = after[name].quantized_weight()
        assert got.scheme == qw.scheme and all(torch.equal(got.data[k], qw.data[k]) for k in qw.data), name
        assert (getattr(after[name], "act", None) is not None) == (act is not None)
    card = (out / "README.md").read_text()
    meta = read_front_matter(card)
    assert meta["license"] == "tiny-licence" and meta["base_model"] == "test/tiny" and meta["quantized_by"] == "lowbit"
    assert "lowbit export" in card and '"recipe"' in card and "bits_per_weight" in card
    # exporting what was read writes the same tensors: the codes went through untouched
    again = tmp_path / "again"
    assert main(["export", str(out), "--to", to, "-o", str(again), "--quiet"]) == 0
    from safetensors.torch import load_file

    a, b = load_file(out / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert main(["export", str(ckpt), "--to", to, "-o", str(out), "--quiet", "--overwrite"]) == 0  # lowbit's: replaced


@pytest.mark.parametrize("to,scheme,message", [
    ("gptq", QuantScheme(format="nf4", group_size=64), "GPTQ cannot store layer model.layers.0.self_attn.q_proj "
                                                       "(nf4 g64): GPTQ stores integer codes, not nf4"),
    ("awq", QuantScheme(bits=8, group_size=64), "AWQ's GEMM layout stores int4 codes"),
    ("compressed-tensors", QuantScheme(bits=4, group_size=64, double_quant=True), "not 8-bit or two-level codes"),
])
def test_a_scheme_the_format_cannot_hold_is_one_line_and_no_output(to, scheme, message, tiny_llama_dir, tmp_path,
                                                                   capsys):
    ckpt = _quantized(tiny_llama_dir, tmp_path, lowbit.Recipe(default=scheme))
    out = tmp_path / "out"
    assert main(["export", str(ckpt), "--to", to, "-o", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and message in err.splitlines()[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # nothing written, no partial beside it
    assert main(["export", str(ckpt), "--to", to, "--check"]) == 0
    first = capsys.readouterr().out.splitlines()[0]  # --check: per layer, refused (not re-encoded) and why
    assert first.startswith("model.layers.0.") and "refused: " in first


def test_w8a8_inputs_are_written_as_vllm_runs_them_and_dynamic_per_tensor_is_refused(tiny_llama_dir, tmp_path,
                                                                                       capsys):
    """Per-token dynamic and static per-tensor inputs get the config vLLM selects its int8 W8A8 scheme by
    (``_is_dynamic_token_w8a8`` / ``_is_static_tensor_w8a8``); vLLM has no dynamic per-tensor form, so that
    one is refused in one line with nothing written."""
    int8 = QuantScheme(bits=8, granularity="channel")
    for act, strategy in ((ActScheme(), "token"), (ActScheme(dynamic=False, granularity="tensor"), "tensor")):
        recipe = lowbit.Recipe(default=int8, activations=act)
        model, tokenizer = lowbit.load(str(tiny_llama_dir))
        windows = torch.randint(0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
        lowbit.quantize(model, recipe, progress=False, calibration=None if act.dynamic else windows)
        ckpt = tmp_path / f"ckpt-{strategy}"
        lowbit.save_quantized(model, ckpt, recipe=recipe, tokenizer=tokenizer)
        assert main(["export", str(ckpt), "--to", "compressed-tensors", "-o", str(tmp_path / strategy), "--quiet"]) == 0
        group = json.loads((tmp_path / strategy / "config.json").read_text())["quantization_config"]["config_groups"]
        inputs = group["group_0"]["input_activations"]
        assert (inputs["num_bits"], inputs["type"], inputs["symmetric"], inputs["strategy"], inputs["dynamic"]) == \
            (8, "int", True, strategy, act.dynamic)
    recipe = lowbit.Recipe(default=int8, activations=ActScheme(granularity="tensor"))
    ckpt = _quantized(tiny_llama_dir, tmp_path / "per-tensor", recipe)
    out = tmp_path / "per-tensor" / "out"
    assert main(["export", str(ckpt), "--to", "compressed-tensors", "-o", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "".join(err) and "int8 dynamic per-tensor inputs" in err[-1]
    assert "--act-granularity token" in err[-1] and not out.exists()


def test_a_prequantized_directory_with_a_missing_tensor_is_one_line(tiny_llama_dir, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    ckpt = _quantized(tiny_llama_dir, tmp_path, lowbit.Recipe(default=QuantScheme(bits=4, group_size=64)))
    out = tmp_path / "gptq"
    assert main(["export", str(ckpt), "--to", "gptq", "-o", str(out), "--quiet"]) == 0
    state = load_file(out / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.qzeros"]
    save_file(state, out / "model.safetensors")
    assert main(["eval", str(out), "--max-windows", "1", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and "model.layers.1.mlp.up_proj: tensor 'qzeros' is missing" in err.splitlines()[-1]


def test_float32_scales_of_a_compressed_tensors_directory_are_read_exactly(tiny_llama_dir, tmp_path):
    """llm-compressor saves scales in the model's dtype, float32 for a float32 model: scales float16 cannot
    hold are kept in float32 (``float32_scales``), so the weights are the file's exactly; scales it can hold
    stay float16."""
    from safetensors.torch import load_file, save_file

    from lowbit.nn import quantized_layers

    ckpt = _quantized(tiny_llama_dir, tmp_path, lowbit.Recipe(default=QuantScheme(bits=4, group_size=64)))
    out = tmp_path / "ct"
    assert main(["export", str(ckpt), "--to", "compressed-tensors", "-o", str(out), "--quiet"]) == 0
    state = load_file(out / "model.safetensors")
    name = "model.layers.0.mlp.up_proj"
    state[f"{name}.weight_scale"] = state[f"{name}.weight_scale"].float() * (1 + 2.0 ** -20)  # not float16
    save_file(state, out / "model.safetensors")
    model, _ = lowbit.load(str(out))
    layers = quantized_layers(model)
    assert layers[name].scheme.float32_scales and not layers["model.layers.0.mlp.gate_proj"].scheme.float32_scales
    stored = layers[name].quantized_weight().tensors()["scale"]
    assert stored.dtype == torch.float32 and torch.equal(stored, state[f"{name}.weight_scale"].reshape(stored.shape))
    original = quantized_layers(lowbit.load(str(ckpt))[0])[name].quantized_weight()
    codes = original.dequantize() / original.tensors()["scale"].float().repeat_interleave(64, 1)  # exact: small ints
    assert torch.equal(layers[name].quantized_weight().dequantize(), codes * stored.repeat_interleave(64, 1))


def test_a_compressed_tensors_directory_with_asymmetric_input_activations_is_one_line(tiny_llama_dir, tmp_path,
                                                                                      capsys):
    """lowbit's activation schemes are symmetric: an ``input_zero_point`` scheme is refused, not read as
    symmetric."""
    recipe = lowbit.Recipe(default=QuantScheme(bits=8, granularity="channel"), activations=ActScheme())
    ckpt = _quantized(tiny_llama_dir, tmp_path, recipe)
    out = tmp_path / "ct"
    assert main(["export", str(ckpt), "--to", "compressed-tensors", "-o", str(out), "--quiet"]) == 0
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["input_activations"]["symmetric"] = False
    (out / "config.json").write_text(json.dumps(config))
    assert main(["eval", str(out), "--max-windows", "1", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "".join(err) and "asymmetric (input_zero_point), have no lowbit activation" in err[-1]


def test_licence_is_read_where_the_source_states_it_and_never_guessed(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"license": "mit"}))
    assert origin_of(tmp_path).license == "mit"
    (tmp_path / "README.md").write_text("---\nlicense: apache-2.0\n---\n")
    assert origin_of(tmp_path).license == "apache-2.0"
    bare = tmp_path / "bare"
    bare.mkdir()
    assert origin_of(bare).license is None
    text = render_model_card(ModelCard(ModelOrigin("x/y", None, "here"), "GPTQ int4 g64"))
    assert "license" not in read_front_matter(text) and "states no licence" in text
    from lowbit.io.model_card import write_model_card

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        write_model_card(bare, ModelCard(ModelOrigin("x/y", None, "here"), "GPTQ"))
    assert any("states no licence" in str(w.message) for w in caught)


def test_gguf_and_lowbit_checkpoint_carry_the_source_licence(licensed_source, tmp_path):
    from gguf import GGUFReader

    ckpt = _quantized(licensed_source, tmp_path, lowbit.Recipe(default=QuantScheme(bits=8, group_size=32)))
    assert read_front_matter((ckpt / "README.md").read_text())["license"] == "tiny-licence"
    out = tmp_path / "m.gguf"
    assert main(["export", str(ckpt), "--to", "gguf", "-o", str(out), "--quiet"]) == 0
    fields = GGUFReader(str(out)).fields
    assert fields["general.license"].contents() == "tiny-licence"
    assert fields["general.base_model.0.name"].contents() == "test/tiny"
    assert fields["general.quantized_by"].contents() == "lowbit"

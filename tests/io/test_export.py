"""The exporter table: every entry refuses what it cannot write with one line, says why a scheme is
not lossless, and round-trips a tiny quantized model; ``export`` and its ``export-gguf`` alias."""

from __future__ import annotations

import json

import pytest
import torch

import lowbit
from lowbit.act_scheme import ActScheme
from lowbit.cli import main
from lowbit.io.export import EXPORTERS, Feature, check_export, lossless_layers
from lowbit.nn import quantized_layers

INT8_G32 = lowbit.QuantScheme(bits=8, group_size=32, symmetric=True)  # Q8_0's codes and scales exactly
INT4_G64_ASYM = lowbit.QuantScheme(bits=4, group_size=64, symmetric=False)


def _checkpoint(src, out, recipe: lowbit.Recipe):
    model, tokenizer = lowbit.load(str(src))
    lowbit.quantize(model, recipe, progress=False)
    lowbit.save_quantized(model, out, recipe=recipe, tokenizer=tokenizer)
    return out


@pytest.fixture(scope="module")
def int8_checkpoint(tiny_llama_dir, tmp_path_factory):
    return _checkpoint(tiny_llama_dir, tmp_path_factory.mktemp("ckpt") / "int8", lowbit.Recipe(default=INT8_G32))


@pytest.fixture(scope="module")
def feature_sources(tiny_llama_dir, tmp_path_factory):
    """A model source with each ``Feature`` an exporter may refuse."""
    rotated = _checkpoint(tiny_llama_dir, tmp_path_factory.mktemp("ckpt") / "rotated",
                          lowbit.Recipe(default=INT8_G32, transforms=("hadamard",)))
    w8a8 = _checkpoint(tiny_llama_dir, tmp_path_factory.mktemp("ckpt") / "w8a8",
                       lowbit.Recipe(default=lowbit.QuantScheme(bits=8, granularity="channel"),
                                     activations=ActScheme()))
    return {Feature.ONLINE_ROTATION: rotated, Feature.NO_QUANTIZED_LAYERS: tiny_llama_dir,
            Feature.QUANTIZED_ACTIVATIONS: w8a8, Feature.QUANTIZED_EMBEDDING: _tied_head_checkpoint(
                tiny_llama_dir, tmp_path_factory.mktemp("ckpt"))}


def _tied_head_checkpoint(src, work):
    """A checkpoint whose quantized LM head is tied to the input embedding (a ``QuantEmbedding``)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src)
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    model.save_pretrained(work / "tied")
    lowbit.load(str(src))[1].save_pretrained(work / "tied")
    return _checkpoint(work / "tied", work / "tied-q", lowbit.Recipe(default=INT8_G32, skip=()))


def _output(tmp_path, exporter):
    return tmp_path / ("out.bin" if exporter.writes == "file" else "out")


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


def test_every_feature_has_a_model_to_test_refusals_with(feature_sources):
    assert set(feature_sources) == set(Feature)


@pytest.mark.parametrize("name,feature", [(e.name, f) for e in EXPORTERS.values() for f in e.cannot_write])
def test_every_exporter_refuses_what_it_cannot_write_with_one_line(name, feature, feature_sources, tmp_path, capsys):
    out = _output(tmp_path, EXPORTERS[name])
    assert main(["export", str(feature_sources[feature]), "--to", name, "-o", str(out), "--quiet"]) == 2
    err = _one_line_error(capsys)
    assert f"{name} cannot write a model with {feature.value}: {EXPORTERS[name].cannot_write[feature]}" in err
    assert list(tmp_path.iterdir()) == []  # no output, no partial file beside it


@pytest.mark.parametrize("name", list(EXPORTERS))
def test_every_exporter_refuses_an_existing_output_before_loading(name, tmp_path, capsys):
    out = _output(tmp_path, EXPORTERS[name])
    if EXPORTERS[name].writes == "file":
        out.write_bytes(b"keep me")
    else:
        out.mkdir()
        (out / "keep").write_bytes(b"keep me")
    # the model does not exist: the output check comes first, before any slow load
    assert main(["export", str(tmp_path / "no-such-model"), "--to", name, "-o", str(out), "--quiet"]) == 2
    assert "already exists" in _one_line_error(capsys)
    assert (out if out.is_file() else out / "keep").read_bytes() == b"keep me"


@pytest.mark.parametrize("name", list(EXPORTERS))
@pytest.mark.parametrize("scheme", [INT8_G32, INT4_G64_ASYM, lowbit.QuantScheme(format="nf4", group_size=64),
                                    lowbit.QuantScheme(bits=4, group_size=32, symmetric=False),
                                    lowbit.QuantScheme(bits=8, granularity="channel")])
def test_lossless_is_none_or_a_reason(name, scheme):
    why = EXPORTERS[name].lossless(scheme)
    assert why is None or (isinstance(why, str) and why and "\n" not in why)


@pytest.mark.parametrize("scheme,expected", [
    (INT8_G32, None),  # Q8_0
    (lowbit.QuantScheme(bits=4, group_size=32, symmetric=False, zero_point="float"), None),  # Q4_1
    (INT4_G64_ASYM, "blocks hold 32 values under one scale"),
    (lowbit.QuantScheme(format="nf4", group_size=32), "no GGUF block type with the same code table"),
    (lowbit.QuantScheme(bits=4, group_size=32, symmetric=False), "m = -s z in float16 does not reproduce it"),
    (lowbit.QuantScheme(bits=3, group_size=32), "no GGUF block type stores symmetric int3"),
])
def test_gguf_says_why_a_scheme_is_not_lossless(scheme, expected):
    why = EXPORTERS["gguf"].lossless(scheme)
    assert why is None if expected is None else expected in why
    assert EXPORTERS["lowbit"].lossless(scheme) is None  # a checkpoint stores every scheme as it is


def _weights(model) -> dict[str, torch.Tensor]:
    """Each quantized layer's weight as float: dequantized codes, or the float weight a loader built."""
    layers = quantized_layers(model)
    names = [n for n, m in model.named_modules()
             if n.startswith("model.layers.") and (n in layers or isinstance(m, torch.nn.Linear))]
    return {n: layers[n].quantized_weight().dequantize(torch.float32) if n in layers
            else model.get_submodule(n).weight.detach().float() for n in names}


# lowbit reads back its own formats and those it stores exactly; ONNX and TFLite are read by their
# runtimes (tests/onnx, tests/tflite)
@pytest.mark.parametrize("name", [name for name, e in EXPORTERS.items()
                                  if name not in ("onnx", "tflite") and e.lossless(INT8_G32) is None])
def test_round_trip_of_a_lossless_scheme_through_every_exporter(name, int8_checkpoint, tmp_path, capsys):
    out = _output(tmp_path, EXPORTERS[name]).with_suffix(".gguf" if name == "gguf" else "")
    assert main(["export", str(int8_checkpoint), "--to", name, "-o", str(out), "--json", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["path"] == str(out)
    expected = _weights(lowbit.load(int8_checkpoint)[0])
    got = _weights(lowbit.load(out)[0])
    assert expected.keys() == got.keys() and len(got) == 14
    for layer, w in expected.items():
        assert torch.equal(got[layer], w), layer


def test_check_prints_per_layer_whether_it_maps_losslessly(tiny_llama_dir, tmp_path, capsys):
    recipe = lowbit.Recipe(default=INT8_G32, overrides=(lowbit.Override("down_proj", INT4_G64_ASYM),))
    ckpt = _checkpoint(tiny_llama_dir, tmp_path / "mixed", recipe)
    assert main(["export", str(ckpt), "--to", "gguf", "--check", "--json"]) == 0
    layers = json.loads(capsys.readouterr().out)["layers"]
    assert len(layers) == 14
    for layer, why in layers.items():
        assert (why is None) == ("down_proj" not in layer), layer
    assert main(["export", str(ckpt), "--to", "gguf", "--check"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "12 of 14 quantized layers map losslessly onto gguf"
    assert "re-encoded: GGUF's Q*_0/Q*_1 blocks hold 32 values" in next(x for x in lines if "down_proj" in x)
    assert lossless_layers("lowbit", {"x": INT4_G64_ASYM}) == {"x": None}


def test_export_gguf_is_export_to_gguf(tiny_llama_dir, tmp_path, capsys):
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    assert main(["export-gguf", str(tiny_llama_dir), "-o", str(a), "--type", "Q4_0", "--quiet"]) == 0
    assert main(["export", str(tiny_llama_dir), "--to", "gguf", "-o", str(b), "--type", "q4_0", "--quiet"]) == 0
    assert a.read_bytes() == b.read_bytes()
    assert "Q4_0" in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    (["--to", "lowbit", "-o", "{tmp}/o", "--type", "Q8_0"], "--type applies to --to gguf, not --to lowbit"),
    (["--to", "gguf", "-o", "{tmp}/o.gguf", "--type", "Q9_9"], "unknown GGUF type 'Q9_9'"),
    (["--to", "gguf", "-o", "{tmp}/o.gguf"], "a float model has no GGUF type of its own"),
    (["--to", "gguf"], "needs -o/--output"),
])
def test_bad_export_arguments_are_one_line(tiny_llama_dir, tmp_path, capsys, args, message):
    assert main(["export", str(tiny_llama_dir), *[a.format(tmp=tmp_path) for a in args], "--quiet"]) == 2
    assert message in _one_line_error(capsys)
    assert list(tmp_path.iterdir()) == []


def test_calibrated_options_need_calibration(tiny_llama_dir, tmp_path):
    model, tokenizer = lowbit.load(str(tiny_llama_dir))
    with pytest.raises(ValueError, match="needs calibration data"):
        lowbit.export(model, tokenizer, tmp_path / "m.gguf", to="gguf", type="Q4_0", imatrix=True)
    with pytest.raises(ValueError, match="unknown export format 'coreml'; choose one of lowbit, gguf, gptq"):
        check_export("coreml", tmp_path / "m.mlpackage", overwrite=False)


def test_a_new_exporter_is_one_table_entry(int8_checkpoint, tmp_path, monkeypatch, capsys):
    """An entry brings its ``--to`` value, its options and its refusals to the CLI with no other edit."""
    from dataclasses import dataclass

    from lowbit.io.export import Exporter, Option

    @dataclass
    class Written:
        path: object

        def to_dict(self):
            return {"path": str(self.path)}

        def summary(self):
            return [f"{self.path}: toy"]

    def write(model, tokenizer, path, *, statistics=None, label="none"):
        layers = {name: layer.quantized_weight().scheme.describe() for name, layer in quantized_layers(model).items()}
        path.write_text(json.dumps({"label": label, "layers": layers}))
        return Written(path)

    toy = Exporter(name="toy", writes="file", help="layer schemes as JSON", write=write, lossless=lambda s: None,
                   cannot_write={Feature.NO_QUANTIZED_LAYERS: "there would be nothing to list"},
                   options=(Option("label", "a name written into the file"),))
    monkeypatch.setitem(EXPORTERS, "toy", toy)
    out = tmp_path / "layers.json"
    assert main(["export", str(int8_checkpoint), "--to", "toy", "-o", str(out), "--label", "x", "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == f"{out}: toy"
    written = json.loads(out.read_text())
    assert written["label"] == "x" and set(written["layers"].values()) == {"int8 g32"}
    assert main(["export", str(int8_checkpoint), "--to", "gguf", "-o", str(tmp_path / "m.gguf"), "--label", "x"]) == 2
    assert "--label applies to --to toy, not --to gguf" in _one_line_error(capsys)

"""bitsandbytes checkpoints read as lowbit weights: the published layout (written here from lowbit's own
codes, so CI needs no bitsandbytes) round-trips; where bitsandbytes is installed, its own quantizer and
dequantizer are the oracle, bit for bit for NF4 with and without double quantization."""

from __future__ import annotations

import json

import pytest
import torch

from lowbit.formats import FormatName, make_format
from lowbit.io.bnb_layout import bnb_weight
from lowbit.methods.rtn import quantize_rtn
from lowbit.qweight import QuantizedWeight
from lowbit.scheme import QuantScheme

SHAPE = (256, 512)


def _saved(packed: torch.Tensor, state) -> dict[str, torch.Tensor]:
    """What ``Linear4bit`` saves: the packed weight and its quant state under ``weight.``."""
    return {"weight": packed, **{f"weight.{k}": v for k, v in state.as_dict(packed=True).items()}}


def _state_tensor(state: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(state).encode("utf-8")), dtype=torch.uint8)


def _published_layout(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """bitsandbytes' ``QuantState.as_dict(packed=True)`` of an nf4 g64 weight: codes two a byte over the
    flattened weight, the first in the high nibble; float32 absmax; the NF4 table; the JSON state."""
    codes = qw.codes().reshape(-1)
    return {"weight": ((codes[0::2] << 4) | codes[1::2]).reshape(-1, 1),
            "weight.absmax": qw.scales().reshape(-1).float(),
            "weight.quant_map": make_format(FormatName.NF4, 4).table.clone(),
            "weight.quant_state.bitsandbytes__nf4": _state_tensor(
                {"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": list(SHAPE)})}


def test_published_nf4_layout_round_trips_to_the_same_codes_and_scales():
    w = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    qw = quantize_rtn(w, QuantScheme(format="nf4", group_size=64))
    read, note = bnb_weight(_published_layout(qw), SHAPE, "q_proj")
    assert note is None and read.scheme.describe() == "nf4 g64 fp32-scales"
    assert torch.equal(read.codes(), qw.codes()) and torch.equal(read.dequantize(), qw.dequantize())


def test_a_table_that_is_not_lowbits_is_dequantized_and_said():
    w = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    tensors = _published_layout(quantize_rtn(w, QuantScheme(format="nf4", group_size=64)))
    tensors["weight.quant_map"] = tensors["weight.quant_map"] * 0.5
    weight, note = bnb_weight(tensors, SHAPE, "q_proj")
    assert isinstance(weight, torch.Tensor) and weight.shape == SHAPE and "not a lowbit format" in note


def test_missing_or_misshapen_quant_state_is_refused_in_one_line():
    w = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    tensors = _published_layout(quantize_rtn(w, QuantScheme(format="nf4", group_size=64)))
    with pytest.raises(ValueError, match="q_proj: bitsandbytes tensor 'weight.absmax' is missing"):
        bnb_weight({k: v for k, v in tensors.items() if k != "weight.absmax"}, SHAPE, "q_proj")
    with pytest.raises(ValueError, match="quant_state.bitsandbytes__nf4' \\(or fp4\\) or 'SCB' is missing"):
        bnb_weight({k: v for k, v in tensors.items() if "quant_state" not in k}, SHAPE, "q_proj")
    with pytest.raises(ValueError, match="holds 65535 bytes"):
        bnb_weight(dict(tensors, weight=tensors["weight"][1:]), SHAPE, "q_proj")


@pytest.mark.parametrize("double_quant", [False, True])
def test_bitsandbytes_nf4_is_read_bit_for_bit(double_quant):
    F = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3)) * 0.02
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    read, note = bnb_weight(_saved(packed, state), SHAPE, "q_proj")
    assert isinstance(read, QuantizedWeight) and (note is not None) == double_quant
    assert torch.equal(read.dequantize(), F.dequantize_4bit(packed, state))


def test_bitsandbytes_fp4_is_dequantized_exactly_and_int8_within_rounding():
    F = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4)) * 0.02
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="fp4")
    weight, note = bnb_weight(_saved(packed, state), SHAPE, "q_proj")
    assert "fp4 table is not a lowbit format" in note and torch.equal(weight, F.dequantize_4bit(packed, state))
    codes, scb, _ = F.int8_vectorwise_quant(w.half())
    read, note = bnb_weight({"weight": codes, "SCB": scb}, SHAPE, "q_proj")
    assert note is None and read.scheme.describe() == "int8 per-channel fp32-scales"
    torch.testing.assert_close(read.dequantize(), F.int8_vectorwise_dequant(codes, scb), rtol=2**-23, atol=0)


def _bnb_directory(tiny_llama_dir, out):
    """The tiny Llama as transformers saves a bitsandbytes 4-bit model: every linear of the blocks in
    bitsandbytes' published layout (lowbit's RTN nf4 g64 codes), the rest float, a bitsandbytes config."""
    import shutil

    from safetensors.torch import load_file, save_file

    out.mkdir()
    for f in tiny_llama_dir.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, out / f.name)
    state = load_file(tiny_llama_dir / "model.safetensors")
    codes = {}
    for key in [k for k in state if k.startswith("model.layers.") and k.endswith("proj.weight")]:
        name = key.removesuffix(".weight")
        qw = quantize_rtn(state.pop(key), QuantScheme(format="nf4", group_size=64))
        codes[name] = qw
        layout = _published_layout(qw)
        layout["weight.quant_state.bitsandbytes__nf4"] = _state_tensor(
            {"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": list(qw.shape)})
        state.update({f"{name}.{k}": v for k, v in layout.items()})
    save_file(state, out / "model.safetensors")
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True,
                                     "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": False}
    (out / "config.json").write_text(json.dumps(config))
    return codes


def test_a_bitsandbytes_directory_loads_as_codes_and_a_missing_tensor_is_one_line(tiny_llama_dir, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    import lowbit
    from lowbit.cli import main
    from lowbit.nn import quantized_layers

    codes = _bnb_directory(tiny_llama_dir, tmp_path / "bnb")
    model, _ = lowbit.load(str(tmp_path / "bnb"))
    layers = quantized_layers(model)
    assert set(layers) == set(codes) and len(layers) == 14
    assert all(torch.equal(layers[n].quantized_weight().codes(), qw.codes()) for n, qw in codes.items())
    state = load_file(tmp_path / "bnb" / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight.absmax"]
    save_file(state, tmp_path / "bnb" / "model.safetensors")
    assert main(["eval", str(tmp_path / "bnb"), "--max-windows", "1", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.layers.1.mlp.up_proj: bitsandbytes tensor 'weight.absmax' is missing" in err[0]

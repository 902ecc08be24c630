"""GGUF export of models lowbit quantized (codes copied when the scheme is the GGUF type), with
calibration statistics (imatrix, GPTQ onto the block grid), and from the command line."""

from __future__ import annotations

import json
from types import SimpleNamespace

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType

import lowbit
from lowbit.cli import main
from lowbit.gguf import blocks
from lowbit.gguf.export import _gptq_or_search, export_gguf
from lowbit.gguf.gptq_blocks import gptq_quantize_rows
from lowbit.gguf.statistics import collect_input_stats


def _tensor(path, name: str) -> np.ndarray:
    t = {x.name: x for x in gguf.GGUFReader(path).tensors}[name]
    return gguf.quants.dequantize(t.data, t.tensor_type)


def _quantized(tiny_llama_dir, scheme: lowbit.QuantScheme):
    model, tokenizer = lowbit.load(str(tiny_llama_dir))
    lowbit.quantize(model, lowbit.Recipe(default=scheme), progress=False)
    return model, tokenizer


def test_lowbit_codes_are_copied_when_the_scheme_is_the_gguf_type(tiny_llama_dir, tmp_path):
    model, tokenizer = _quantized(tiny_llama_dir, lowbit.QuantScheme(bits=4, group_size=32, symmetric=False,
                                                                     zero_point="float"))
    report = export_gguf(model, tokenizer, tmp_path / "q41.gguf", "Q4_1")
    assert len(report.copied) == 14 and not report.requantized
    for hf, name in [(model.model.layers[1].mlp.down_proj, "blk.1.ffn_down.weight"),
                     (model.model.layers[0].self_attn.o_proj, "blk.0.attn_output.weight")]:
        expected = hf.quantized_weight().dequantize().numpy()
        assert np.array_equal(_tensor(tmp_path / "q41.gguf", name).reshape(expected.shape), expected)
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "QuantLinear"  # the model is left as it was


def test_q_k_codes_are_permuted_like_float_weights(tiny_llama_dir, tmp_path):
    model, tokenizer = _quantized(tiny_llama_dir, lowbit.QuantScheme(bits=8, group_size=32, symmetric=True))
    export_gguf(model, tokenizer, tmp_path / "copied.gguf", "Q8_0")
    dequantized, _ = lowbit.load(str(tiny_llama_dir))
    dequantized.model.layers[0].self_attn.q_proj.weight.data = (
        model.model.layers[0].self_attn.q_proj.quantized_weight().dequantize())
    report = export_gguf(dequantized, tokenizer, tmp_path / "float.gguf", "F32")
    assert report.qtype == "F32"
    assert np.array_equal(_tensor(tmp_path / "copied.gguf", "blk.0.attn_q.weight"),
                          _tensor(tmp_path / "float.gguf", "blk.0.attn_q.weight"))


def test_other_schemes_are_requantized_and_reported(tiny_llama_dir, tmp_path):
    model, tokenizer = _quantized(tiny_llama_dir, lowbit.QuantScheme(bits=4, group_size=64, symmetric=False))
    report = export_gguf(model, tokenizer, tmp_path / "q4.gguf", "Q4_0")
    assert not report.copied and len(report.requantized) == 14
    assert "groups of 32" in report.requantized[0]


def test_gptq_onto_block_grids_lowers_output_error(tiny_llama_dir, tmp_path):
    model, tokenizer = lowbit.load(str(tiny_llama_dir))
    windows = torch.randint(3, 500, (4, 64), generator=torch.Generator().manual_seed(0))
    stats = collect_input_stats(model, windows, hessians=True, progress=False)
    assert stats.tokens == 256 and set(stats.hessians) == set(stats.importance)
    name = "model.layers.1.mlp.down_proj"
    H = stats.hessians[name]
    assert torch.allclose(torch.diagonal(H) / 2, torch.from_numpy(stats.importance[name]), rtol=1e-4, atol=1e-7)
    plain = export_gguf(model, tokenizer, tmp_path / "imatrix.gguf", "Q4_0", importance=stats.importance)
    gptq = export_gguf(model, tokenizer, tmp_path / "gptq.gguf", "Q4_0", importance=stats.importance,
                       hessians=stats.hessians)
    # 14 block linears and the untied output matrix
    assert not plain.gptq and len(gptq.gptq) + len(gptq.searched) == 15 and gptq.file_size == plain.file_size
    W = model.model.layers[1].mlp.down_proj.weight.detach().numpy()

    def output_error(path):
        delta = torch.from_numpy(_tensor(path, "blk.1.ffn_down.weight") - W)
        return float(torch.trace(delta @ H @ delta.T))

    assert output_error(tmp_path / "gptq.gguf") < 0.9 * output_error(tmp_path / "imatrix.gguf")


def test_gptq_gives_way_to_the_search_where_its_output_error_is_larger():
    """Weights that were Q4_K before: here the search's blocks come closer to them than GPTQ's."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(64, 512, generator=g).numpy()
    X = torch.randn(2048, 512, generator=g) * torch.rand(512, generator=g) * 3
    H, importance, qtype = 2 * X.T @ X / len(X), (X * X).mean(0).numpy(), GGMLQuantizationType.Q4_K
    on_grid = blocks.dequantize_rows(blocks.quantize_rows(W, qtype, importance), qtype, 512)
    errors = {}
    for label, data in (("gptq", gptq_quantize_rows(on_grid, H, qtype, importance=importance)),
                        ("search", blocks.quantize_rows(on_grid, qtype, importance))):
        delta = torch.from_numpy(blocks.dequantize_rows(data, qtype, 512) - on_grid)
        errors[label] = (float(((delta @ H) * delta).sum()), data)
    assert errors["search"][0] < errors["gptq"][0]
    planned = SimpleNamespace(qtype=qtype)
    data, gptq_won = _gptq_or_search(planned, on_grid, importance, H)
    assert not gptq_won and np.array_equal(data, errors["search"][1])
    data, gptq_won = _gptq_or_search(planned, W, importance, H)  # off the grid GPTQ wins, as usual
    assert gptq_won and np.array_equal(data, gptq_quantize_rows(W, H, qtype, importance=importance))


def test_export_gguf_from_the_command_line(tiny_llama_dir, tmp_path, capsys):
    calib = tmp_path / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    out = tmp_path / "m.gguf"
    args = ["export-gguf", str(tiny_llama_dir), "-o", str(out), "--type", "q4_k_m", "--gptq", "--calib", str(calib),
            "--calib-samples", "2", "--calib-seqlen", "32", "--json", "--quiet"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["type"] == "Q4_K_M" and report["gptq"] > 0 and report["calibration_tokens"] == 64
    assert out.is_file() and not (tmp_path / "m.gguf.tmp").exists()
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["export-gguf", str(tiny_llama_dir), "-o", str(tmp_path / "x.gguf"), "--type", "Q9_9"]) == 2
    assert "Q9_9" in capsys.readouterr().err


def test_statistics_are_shared_by_layers_reading_one_input(tiny_llama_dir):
    model, _ = lowbit.load(str(tiny_llama_dir))
    windows = torch.randint(3, 500, (3, 32), generator=torch.Generator().manual_seed(1))
    stats = collect_input_stats(model, windows, hessians=True, progress=False)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, key=key: inputs.setdefault(key, []).append(args[0][0]))
             for key, m in (("q", attn.q_proj), ("o", attn.o_proj), ("up", mlp.up_proj))]
    with torch.no_grad():
        for w in windows:
            model(w.reshape(1, -1))
    for h in hooks:
        h.remove()
    for key, names in (("q", ["q_proj", "k_proj", "v_proj"]), ("o", ["o_proj"]), ("up", ["gate_proj", "up_proj"])):
        x = torch.cat(inputs[key])
        expected = 2 * x.T @ x / len(x)
        for short in names:
            name = f"model.layers.0.{'self_attn' if key in ('q', 'o') else 'mlp'}.{short}"
            assert torch.allclose(stats.hessians[name], expected, rtol=1e-4, atol=1e-6), name
            assert np.allclose(stats.importance[name], (x * x).mean(0).numpy(), rtol=1e-4, atol=1e-7), name


@pytest.mark.parametrize("windows", [torch.zeros(0, 8, dtype=torch.long), torch.zeros(8, dtype=torch.long)])
def test_statistics_need_windows(tiny_llama_dir, windows):
    model, _ = lowbit.load(str(tiny_llama_dir))
    with pytest.raises(ValueError, match="at least one window"):
        collect_input_stats(model, windows, progress=False)


def test_quantize_with_gguf_copies_the_codes(tiny_llama_dir, tmp_path, capsys):
    out, gguf_file = tmp_path / "ckpt", tmp_path / "q80.gguf"
    assert main(["quantize", str(tiny_llama_dir), "-o", str(out), "--bits", "8", "--group-size", "32",
                 "--gguf", str(gguf_file), "--quiet"]) == 0
    assert "Q8_0" in capsys.readouterr().out
    model, _ = lowbit.load(out)
    expected = model.model.layers[1].mlp.up_proj.quantized_weight().dequantize().numpy()
    assert np.array_equal(_tensor(gguf_file, "blk.1.ffn_up.weight").reshape(expected.shape), expected)
    assert main(["quantize", str(tiny_llama_dir), "-o", str(tmp_path / "c2"), "--bits", "4", "--group-size", "64",
                 "--gguf", str(tmp_path / "x.gguf"), "--quiet"]) == 2
    assert "quantize --gguf-type" in capsys.readouterr().err

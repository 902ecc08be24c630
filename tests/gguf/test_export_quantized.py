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
from lowbit.pipeline.statistics import InputMoments, stream_input_statistics


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


def _statistics(model, windows, hessian=True):
    """Every chunk of ``stream_input_statistics`` over the model's linears (a tiny model: all fit)."""
    return list(stream_input_statistics(model, windows, lambda m: isinstance(m, torch.nn.Linear),
                                        new_record=lambda: InputMoments(hessian), progress=False))


def test_gptq_onto_block_grids_lowers_output_error(tiny_llama_dir, tmp_path):
    model, tokenizer = lowbit.load(str(tiny_llama_dir))
    windows = torch.randint(3, 500, (4, 64), generator=torch.Generator().manual_seed(0))
    chunks = _statistics(model, windows)
    records = {name: record for chunk in chunks for name, record in chunk.items()}
    assert len(chunks) == 3 and "lm_head" in chunks[-1]  # two blocks, then the untied output matrix
    name = "model.layers.1.mlp.down_proj"
    H = records[name].H
    assert torch.allclose(torch.diagonal(H) / 2, records[name].sqmean, rtol=1e-4, atol=1e-7)
    importance = {name: record.sqmean.numpy() for name, record in records.items()}
    plain = export_gguf(model, tokenizer, tmp_path / "imatrix.gguf", "Q4_0", importance=importance)
    gptq = export_gguf(model, tokenizer, tmp_path / "gptq.gguf", "Q4_0", statistics=chunks)
    # 14 block linears and the untied output matrix
    assert not plain.gptq and len(gptq.gptq) + len(gptq.searched) == 15 and gptq.file_size == plain.file_size
    W = model.model.layers[1].mlp.down_proj.weight.detach().numpy()

    def output_error(path):
        delta = torch.from_numpy(_tensor(path, "blk.1.ffn_down.weight") - W)
        return float(torch.trace(delta @ H @ delta.T))

    assert output_error(tmp_path / "gptq.gguf") < 0.9 * output_error(tmp_path / "imatrix.gguf")
    with pytest.raises(ValueError, match="importance or statistics, not both"):
        export_gguf(model, tokenizer, tmp_path / "x.gguf", "Q4_0", importance=importance, statistics=chunks)


def test_gptq_export_holds_one_blocks_hessians_at_a_time(tiny_llama_dir, tmp_path, live_records):
    """Fed a lazy stream, the export encodes each block's weights while only that block's records exist."""
    model, tokenizer = lowbit.load(str(tiny_llama_dir))
    windows = torch.randint(3, 500, (2, 32), generator=torch.Generator().manual_seed(0))
    stream = stream_input_statistics(model, windows, lambda m: isinstance(m, torch.nn.Linear),
                                     new_record=live_records, progress=False)
    report = export_gguf(model, tokenizer, tmp_path / "gptq.gguf", "Q4_0", statistics=stream)
    assert len(report.gptq) + len(report.searched) == 15
    assert live_records.peak == 4  # one block's inputs: q/k/v, o, gate/up, down


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
    data, (gptq_error, search_error) = _gptq_or_search(planned, on_grid, importance, H)
    assert search_error < gptq_error and np.array_equal(data, errors["search"][1])
    data, (gptq_error, search_error) = _gptq_or_search(planned, W, importance, H)  # off the grid GPTQ wins, as usual
    assert gptq_error <= search_error and np.array_equal(data, gptq_quantize_rows(W, H, qtype, importance=importance))


def test_held_out_choice_judges_gptq_and_the_search_on_the_held_out_hessian():
    """GPTQ fitted to inputs that excite other columns than the held-out inputs loses to the search there."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(64, 512, generator=g).numpy()
    half = torch.cat([torch.full((256,), 3.0), torch.full((256,), 0.05)])
    X_fit, X_held = torch.randn(2048, 512, generator=g) * half, torch.randn(2048, 512, generator=g) * half.flip(0)
    H_fit, H_held = 2 * X_fit.T @ X_fit / len(X_fit), 2 * X_held.T @ X_held / len(X_held)
    importance, qtype = (X_fit * X_fit).mean(0).numpy(), GGMLQuantizationType.Q4_0
    planned = SimpleNamespace(qtype=qtype)
    data, errors = _gptq_or_search(planned, W, importance, H_fit, H_held)
    expected = []
    for candidate in (gptq_quantize_rows(W, H_fit, qtype, importance=importance),
                      blocks.quantize_rows(W, qtype, importance)):
        delta = torch.from_numpy(blocks.dequantize_rows(candidate, qtype, 512) - W)
        expected.append((float(((delta @ H_held) * delta).sum()), candidate))
    assert errors == [e for e, _ in expected]
    assert np.array_equal(data, min(expected, key=lambda t: t[0])[1])
    assert errors[1] < errors[0]  # the search wins on the held-out windows here
    _, on_fit = _gptq_or_search(planned, W, importance, H_fit)
    assert on_fit[0] < on_fit[1]  # while GPTQ wins judged on its own fitting inputs


def test_export_with_holdout_records_each_choice(tiny_llama_dir, tmp_path, capsys):
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    assert main(["export-gguf", str(tiny_llama_dir), "-o", str(tmp_path / "c.gguf"), "--type", "q4_0", "--gptq",
                 "--holdout", "2", "--calib", str(text), "--calib-samples", "4", "--calib-seqlen", "32", "--json",
                 "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(report["heldout_choice"]) == report["gptq"] + report["searched"] == 15
    for kept, errors in report["heldout_choice"].values():
        assert kept == ("gptq" if errors["gptq"] <= errors["search"] else "search")
    model, tokenizer = lowbit.load(str(tiny_llama_dir))
    for bad in ("1", "x"):  # refused before any work
        with pytest.raises(ValueError, match="--holdout takes an int"):
            lowbit.export(model, tokenizer, tmp_path / "b.gguf", to="gguf", type="Q4_0", gptq=True, holdout=bad,
                          calibration=None)
    assert main(["export-gguf", str(tiny_llama_dir), "-o", str(tmp_path / "d.gguf"), "--type", "q4_0",
                 "--holdout", "2"]) == 2
    assert "add --gptq" in capsys.readouterr().err


def test_export_gguf_from_the_command_line(tiny_llama_dir, tmp_path, capsys):
    calib = tmp_path / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    out = tmp_path / "m.gguf"
    args = ["export-gguf", str(tiny_llama_dir), "-o", str(out), "--type", "q4_k_m", "--gptq", "--calib", str(calib),
            "--calib-samples", "2", "--calib-seqlen", "32", "--json", "--quiet"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["type"] == "Q4_K_M" and report["gptq"] > 0 and report["calibration_tokens"] == 64
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "m.gguf"]  # no partial or lock file
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["export-gguf", str(tiny_llama_dir), "-o", str(tmp_path / "x.gguf"), "--type", "Q9_9"]) == 2
    assert "Q9_9" in capsys.readouterr().err


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

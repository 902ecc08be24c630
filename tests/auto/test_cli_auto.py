"""The mixed-precision commands on the tiny model: quantize --target-*, info's why, pareto's table and plot."""

from __future__ import annotations

import json

import pytest

from lowbit.auto.pareto import ParetoRow, write_report
from lowbit.cli import main

TEXT = "The tower is 324 metres tall, about the same height as an 81-storey building. " * 200


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "calib.txt"
    path.write_text(TEXT)
    return path


def test_target_bpw_from_the_command_line_and_info_says_why(tiny_llama_dir, tmp_path, text_file, capsys):
    out = tmp_path / "auto"
    assert main(["quantize", str(tiny_llama_dir), "-o", str(out), "--target-bpw", "3.5", "--calib", str(text_file),
                 "--calib-samples", "4", "--calib-seqlen", "64", "--quiet"]) == 0
    assert "allocated 14 tensors under 3.5 bits/weight" in capsys.readouterr().out
    assert (out / "recipe.json").is_file()
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "proxy error" in text and "allocated by lowbit.auto under 3.5 bits/weight" in text
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["bpw"] <= 3.5 and len(info["allocation"]["tensors"]) == 14


def test_target_bpw_with_a_held_out_choice_keeps_it(tiny_llama_dir, tmp_path, text_file, capsys):
    out = tmp_path / "auto"
    assert main(["quantize", str(tiny_llama_dir), "-o", str(out), "--target-bpw", "4", "--method", "gptq",
                 "--holdout", "2", "--holdout-candidates", "rtn", "--calib", str(text_file),
                 "--calib-samples", "18", "--calib-seqlen", "64", "--quiet"]) == 0  # 9 x 64 fit the widest
    assert "held-out choice: " in capsys.readouterr().out  # the allocated recipe kept --holdout
    recipe = json.loads((out / "recipe.json").read_text())
    assert {o.get("method") for o in recipe["overrides"]} & {"gptq", "rtn"}  # each linear's method pinned
    assert len({json.dumps(o["scheme"], sort_keys=True) for o in recipe["overrides"]}) > 1  # and schemes mixed


@pytest.mark.parametrize("args, message", [
    (["--target-size", "90XB"], "unknown size unit 'XB' in '90XB'"),
    (["--target-bpw", "4", "--acts", "int8"], "choose weight-only schemes; drop --acts"),
    (["--target-bpw", "1"], "is below the smallest the candidates allow: possible"),
    (["--target-bpw", "3", "--target-size", "1MiB"], "not allowed with argument"),
])
def test_bad_budgets_are_one_line_and_exit_2(tiny_llama_dir, tmp_path, text_file, capsys, args, message):
    argv = ["quantize", str(tiny_llama_dir), "-o", str(tmp_path / "o"), *args, "--calib", str(text_file),
            "--calib-samples", "2", "--calib-seqlen", "64", "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_pareto_plot_is_written_and_not_empty(tmp_path):
    rows = [ParetoRow("3 bpw", "lowbit auto (rtn)", 2.98, 1 << 20, 40.0, 0.5, 0.6),
            ParetoRow("4 bpw", "lowbit auto (rtn)", 3.97, 3 << 19, 33.0, 0.2, 0.7),
            ParetoRow("int4 g64 gptq", "lowbit", 4.318, None, 34.6, 0.15, 0.79)]
    md, png = write_report(rows, tmp_path / "p", "test")
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| 3 bpw | lowbit auto (rtn) | 2.980 |" in md.read_text()


def test_pareto_command_end_to_end(tiny_llama_dir, tmp_path, text_file, capsys):
    assert main(["pareto", str(tiny_llama_dir), "--budgets", "3,4", "-o", str(tmp_path / "p"), "--windows", "1",
                 "--data", str(text_file), "--calib", str(text_file), "--calib-samples", "2",
                 "--calib-seqlen", "64", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "| 3 bpw |" in out and "| 4 bpw |" in out and (tmp_path / "p" / "pareto.png").stat().st_size > 1000


def test_export_gguf_target_size_of_a_mix(tiny_llama_dir, tmp_path, text_file, capsys):
    import gguf

    out = tmp_path / "m.gguf"
    assert main(["export-gguf", str(tiny_llama_dir), "-o", str(out), "--target-size", "Q4_K_M", "--calib",
                 str(text_file), "--calib-samples", "2", "--calib-seqlen", "64", "--quiet", "--json"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert "allocated 15 tensors" in captured.err
    reader = gguf.GGUFReader(out)
    assert report["file_size"] == out.stat().st_size
    assert len({t.tensor_type.name for t in reader.tensors if len(t.shape) == 2}) >= 1


def test_export_gguf_target_types_are_the_only_ones_chosen(tiny_llama_dir, tmp_path, text_file, capsys):
    import gguf

    out = tmp_path / "k.gguf"
    assert main(["export-gguf", str(tiny_llama_dir), "-o", str(out), "--target-size", "Q4_K_M", "--target-types",
                 "q4_k,Q8_0", "--calib", str(text_file), "--calib-samples", "2", "--calib-seqlen", "64",
                 "--quiet"]) == 0
    chosen = {t.tensor_type.name for t in gguf.GGUFReader(out).tensors if t.name.endswith("_proj.weight")
              or t.name.split(".")[-2] in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up",
                                           "ffn_down")}
    assert chosen and chosen <= {"Q4_K", "Q8_0"} and "Q4_K" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--target-types", "Q4_K"], "--target-types lists what --target-size chooses among; add --target-size"),
    (["--target-size", "Q4_K_M", "--target-types", "Q4_Z"], "--target-types: unknown GGUF tensor type 'Q4_Z'"),
    (["--target-size", "Q4_K_M", "--target-types", ","], "names no type"),
])
def test_export_gguf_bad_target_types_are_one_line(tiny_llama_dir, tmp_path, text_file, capsys, args, message):
    out = tmp_path / "bad.gguf"
    assert main(["export-gguf", str(tiny_llama_dir), "-o", str(out), *args, "--calib", str(text_file),
                 "--calib-samples", "2", "--calib-seqlen", "64", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and not out.exists()

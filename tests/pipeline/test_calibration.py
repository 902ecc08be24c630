"""Calibration windows: deterministic GPTQ-style sampling of real text, and clear errors."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from lowbit.evaluate.text import DATA_ENV_VAR, read_text, tokenize
from lowbit.pipeline.calibration import calibration_windows, clean_wikitext

TEXT = "The quick brown fox jumps over the lazy dog and runs far away from the farm. " * 40


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture()
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "calib.txt"
    path.write_text(TEXT)
    return path


def test_shape_dtype_and_windows_are_slices_of_the_text(tokenizer, text_file):
    windows = calibration_windows(tokenizer, path=text_file, samples=6, seqlen=32, seed=0)
    assert windows.shape == (6, 32) and windows.dtype == torch.long
    ids = tokenize(read_text(text_file), tokenizer)
    for row in windows.tolist():  # every window is a contiguous run of the tokenized text
        assert any(ids[s:s + 32] == row for s in range(len(ids) - 31))


def test_deterministic_for_a_seed_and_different_for_another(tokenizer, text_file):
    a = calibration_windows(tokenizer, path=text_file, samples=8, seqlen=16, seed=0)
    b = calibration_windows(tokenizer, path=text_file, samples=8, seqlen=16, seed=0)
    c = calibration_windows(tokenizer, path=text_file, samples=8, seqlen=16, seed=1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_a_directory_reads_its_txt_files_in_sorted_order(tokenizer, tmp_path):
    (tmp_path / "b.txt").write_text("second part of the text. " * 20)
    (tmp_path / "a.txt").write_text("first part of the text. " * 20)
    (tmp_path / "ignored.md").write_text("not read")
    windows = calibration_windows(tokenizer, path=tmp_path, samples=4, seqlen=8)
    ids = tokenize(read_text(tmp_path / "a.txt") + "\n\n" + read_text(tmp_path / "b.txt"), tokenizer)
    assert windows.shape == (4, 8)
    for row in windows.tolist():
        assert any(ids[s:s + 8] == row for s in range(len(ids) - 7))


def test_a_text_of_exactly_one_window_gives_that_window(tokenizer, tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("hello world, hello fox")
    ids = tokenize(read_text(path), tokenizer)
    windows = calibration_windows(tokenizer, path=path, samples=3, seqlen=len(ids))
    assert windows.tolist() == [ids] * 3


def test_errors_are_one_line_and_name_the_fix(tokenizer, text_file, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(ValueError, match=r"calibration text has \d+ tokens, fewer than one window of 512"):
        calibration_windows(tokenizer, path=short, seqlen=512)
    with pytest.raises(ValueError, match=r"exceed the model's context of 128; use --calib-seqlen <= 128"):
        calibration_windows(tokenizer, path=text_file, seqlen=256, max_context=128)
    with pytest.raises(ValueError, match="at least 1 sample"):
        calibration_windows(tokenizer, path=text_file, samples=0, seqlen=8)
    with pytest.raises(FileNotFoundError, match="--calib"):
        calibration_windows(tokenizer, path=tmp_path / "no-such-file.txt", seqlen=8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .txt files"):
        calibration_windows(tokenizer, path=tmp_path / "empty", seqlen=8)


def test_missing_default_text_tries_datasets_then_asks_for_calib(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_ENV_VAR, str(tmp_path))
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed (or offline)
    with pytest.raises(FileNotFoundError, match=r"`datasets` could not provide .*; pass --calib PATH"):
        calibration_windows(tokenizer, seqlen=8)


def test_clean_wikitext_rejoins_separators_and_drops_unk():
    assert clean_wikitext("a 1 @,@ 000 @-@ strong <unk> army @.@ 5 <unk>") == "a 1,000-strong army.5"


def test_default_text_is_cleaned_wikitext2_validation(tokenizer, tmp_path, monkeypatch):
    (tmp_path / "wikitext-2").mkdir()
    (tmp_path / "wikitext-2" / "valid.txt").write_text(TEXT + " a <unk> b @-@ c")
    (tmp_path / "clean.txt").write_text(TEXT + " a b-c")
    monkeypatch.setenv(DATA_ENV_VAR, str(tmp_path))
    assert torch.equal(calibration_windows(tokenizer, samples=4, seqlen=16),
                       calibration_windows(tokenizer, path=tmp_path / "clean.txt", samples=4, seqlen=16))


def test_bos_starts_every_window(tokenizer, text_file):
    ids = tokenize(read_text(text_file), tokenizer)
    with_bos = calibration_windows(tokenizer, path=text_file, samples=3, seqlen=16, seed=2, bos_id=7)
    assert with_bos.shape == (3, 16) and (with_bos[:, 0] == 7).all()
    for row in with_bos[:, 1:].tolist():  # then 15 consecutive tokens of the text
        assert any(ids[i:i + 15] == row for i in range(len(ids) - 14))


def test_generated_windows_are_the_models_own_samples_and_deterministic(tiny_llama_dir):
    """Each window starts at the start token and continues with the model's temperature-1 samples:
    the KV-cache loop draws exactly what a full forward per token with the same generator draws."""
    import lowbit
    from lowbit.pipeline.calibration import generated_windows

    model, _ = lowbit.load(str(tiny_llama_dir))
    windows = generated_windows(model, 3, 12, start_id=7, seed=5, batch_size=2)
    assert windows.shape == (3, 12) and windows.dtype == torch.long and (windows[:, 0] == 7).all()
    assert torch.equal(windows, generated_windows(model, 3, 12, start_id=7, seed=5, batch_size=2))
    assert not torch.equal(windows, generated_windows(model, 3, 12, start_id=7, seed=6, batch_size=2))

    generator = torch.Generator().manual_seed(5)
    rows = []
    with torch.no_grad():
        for n in (2, 1):  # the batches generated_windows draws, in its order
            ids = torch.full((n, 1), 7, dtype=torch.long)
            for _ in range(11):
                probs = torch.softmax(model(input_ids=ids).logits[:, -1].float(), dim=-1)
                ids = torch.cat([ids, torch.multinomial(probs, 1, generator=generator)], dim=1)
            rows.append(ids)
    assert torch.equal(windows, torch.cat(rows))


def test_generated_windows_refuse_empty_requests(tiny_llama_dir):
    import lowbit
    from lowbit.pipeline.calibration import generated_windows

    model, _ = lowbit.load(str(tiny_llama_dir))
    with pytest.raises(ValueError, match="samples, seqlen and batch size >= 1"):
        generated_windows(model, 0, 12, start_id=7)

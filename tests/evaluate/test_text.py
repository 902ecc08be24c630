"""Evaluation text handling: reading rule, data location, window cutting, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lowbit.evaluate import text as text_mod
from lowbit.evaluate.text import default_eval_path, read_text, token_windows


class CharTokenizer:
    """One id per character; adds a BOS (id 1) only when special tokens are requested."""

    def __init__(self) -> None:
        self.calls = 0

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.calls += 1
        ids = [ord(c) % 500 + 2 for c in text]
        return ([1] + ids) if add_special_tokens else ids


def test_read_text_joins_lines_with_blank_line(tmp_path: Path) -> None:
    p = tmp_path / "t.raw"
    p.write_bytes(" = Title = \n first line . \n second — line \n".encode("utf-8"))
    assert read_text(p) == " = Title = \n\n first line . \n\n second — line "


def test_read_text_missing_file_mentions_datasets(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="datasets") as info:
        read_text(tmp_path / "nope.raw")
    assert "\n" not in str(info.value)


def test_default_eval_path_is_shared_data_beside_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOWBIT_DATA", raising=False)
    repo_root = Path(text_mod.__file__).resolve().parents[2]
    expected = repo_root.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
    assert default_eval_path() == expected


def test_default_eval_path_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LOWBIT_DATA", str(tmp_path))
    assert default_eval_path() == tmp_path / "wikitext-2-raw" / "wiki.test.raw"


def test_windows_cut_exactly_per_protocol() -> None:
    tok = CharTokenizer()
    text = "abcdefghij" * 10 + "xyz"  # 103 tokens
    ids = tok.encode(text, add_special_tokens=False)
    tok.calls = 0
    w = token_windows(text, tok, seqlen=8)
    assert tok.calls == 1  # the whole text is tokenized once
    assert w.dtype == torch.long and w.shape == (12, 8)  # 103 // 8, incomplete tail dropped
    for i in range(12):
        assert w[i].tolist() == ids[i * 8 : (i + 1) * 8]
    assert 1 not in w.tolist()[0]  # no special tokens


def test_windows_max_windows_keeps_first() -> None:
    tok = CharTokenizer()
    text = "the quick brown fox jumps over the lazy dog " * 5
    full = token_windows(text, tok, seqlen=10)
    first = token_windows(text, tok, seqlen=10, max_windows=3)
    assert first.shape == (3, 10)
    assert torch.equal(first, full[:3])
    # Asking for more windows than exist gives all complete windows.
    assert torch.equal(token_windows(text, tok, seqlen=10, max_windows=10_000), full)


def test_windows_with_tokenizers_library() -> None:
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[UNK]": 0, "a": 1, "b": 2, "c": 3}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    w = token_windows("a b c a b c a z", tok, seqlen=3)
    assert w.tolist() == [[1, 2, 3], [1, 2, 3]]


@pytest.mark.parametrize("bad", ["", "   \n\n  "])
def test_empty_text_is_an_error(bad: str) -> None:
    with pytest.raises(ValueError, match="empty"):
        token_windows(bad, CharTokenizer(), seqlen=4)


def test_too_short_text_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"has 5 tokens, fewer than one window of 8; use a smaller --seqlen") as info:
        token_windows("hello", CharTokenizer(), seqlen=8)
    assert "\n" not in str(info.value)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        token_windows("hello", CharTokenizer(), seqlen=0)
    with pytest.raises(ValueError):
        token_windows("hello", CharTokenizer(), seqlen=2, max_windows=0)


def test_real_eval_text_if_present() -> None:
    path = default_eval_path()
    if not path.is_file():
        pytest.skip(f"{path} not available")
    text = read_text(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert text.count("\n\n") == len(lines) - 1
    assert text.startswith(" = Robert Boulter = \n\n Robert Boulter is")

"""A truncated or corrupt .gguf is refused with one line, wherever it is cut."""

from __future__ import annotations

import pytest

import lowbit
from lowbit.gguf.check import check_gguf
from lowbit.gguf.export import export_gguf


@pytest.fixture(scope="module")
def exported(tiny_llama_dir, tmp_path_factory):
    model, tokenizer = lowbit.load(str(tiny_llama_dir))
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    export_gguf(model, tokenizer, path, "Q8_0")
    return path


def test_a_complete_file_passes(exported):
    check_gguf(exported)


@pytest.mark.parametrize("keep", [0.001, 0.01, 0.5, 0.999])
def test_truncated_files_are_refused(exported, tmp_path, keep):
    data = exported.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: max(8, int(len(data) * keep))])
    with pytest.raises(ValueError, match="truncated"):
        check_gguf(cut)
    with pytest.raises(ValueError, match="truncated"):
        lowbit.load(str(cut))


def test_not_a_gguf_and_missing(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ValueError, match="not a GGUF file"):
        check_gguf(bad)
    with pytest.raises(FileNotFoundError):
        check_gguf(tmp_path / "missing.gguf")

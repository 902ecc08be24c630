"""lowbit.io.output_size: the floor estimate of an output's bytes, and check_free_space."""

from __future__ import annotations

import shutil
from collections import namedtuple

import pytest
import torch
from safetensors.torch import save_file

from lowbit.io.output import OutputError, check_free_space, reserve_output
from lowbit.io.output_size import MARGIN_BYTES, expected_bytes, gguf_bits, parameter_count, stored_bytes


def test_parameter_count_reads_headers_only(tmp_path):
    save_file({"a": torch.zeros(3, 4), "b": torch.zeros(5)}, str(tmp_path / "model.safetensors"))
    assert parameter_count(tmp_path) == 17
    assert stored_bytes(tmp_path) == (tmp_path / "model.safetensors").stat().st_size + MARGIN_BYTES


@pytest.mark.parametrize("source", ["someorg/somemodel", "missing-dir", "not-pulled"])
def test_what_cannot_be_counted_is_not_estimated(source, tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_HOME", str(tmp_path))
    assert parameter_count(source) is None
    assert expected_bytes(None, 4) is None


def test_a_corrupt_weights_file_is_left_to_the_loader(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x01" * 12)
    assert parameter_count(tmp_path) is None


def test_expected_bytes_and_gguf_bits():
    assert expected_bytes(1_000_000, 4) >= 500_000 + MARGIN_BYTES
    assert gguf_bits("Q8_0") == 8.5 and gguf_bits("q4_k_m") == 4.5 and gguf_bits("F32") == 32
    with pytest.raises(ValueError, match="unknown GGUF type"):
        gguf_bits("Q9")


def test_check_free_space_names_needed_free_and_path(tmp_path, monkeypatch):
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(100, 90, 10))
    out = tmp_path / "deep" / "out"
    with pytest.raises(OutputError, match=r"not enough disk space for .*out: it needs about 11 bytes .* 10 bytes free"):
        check_free_space(out, 11)
    check_free_space(out, 10)
    with pytest.raises(OutputError), reserve_output(out, overwrite=False, needed=11):
        pass
    assert not out.parent.exists()  # refused before anything was created

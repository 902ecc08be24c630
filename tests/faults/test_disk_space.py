"""Issue 16, part 6: every writing command checks the output's filesystem for the free space its
output needs before any slow work, and refuses with one line (needed vs free bytes, the path)."""

from __future__ import annotations

import shutil
from collections import namedtuple

import pytest

from lowbit import api

Usage = namedtuple("Usage", "total used free")
FREE = 4096  # bytes: less than any model's output


@pytest.fixture
def full_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    """A filesystem with ``FREE`` bytes left, and a load that fails the test if a command gets to it."""
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(1 << 40, (1 << 40) - FREE, FREE))

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the free space was checked")

    monkeypatch.setattr(api, "load", no_load)


@pytest.mark.parametrize("argv", [
    ["quantize", "{model}", "-o", "{out}", "--group-size", "32"],
    ["quantize", "{model}", "-o", "{tmp}/ok", "--group-size", "32", "--gguf", "{out}", "--gguf-type", "Q8_0"],
    ["export-gguf", "{model}", "-o", "{out}", "--type", "Q8_0"],
    ["export", "{ckpt}", "--to", "gguf", "-o", "{out}"],
    ["finetune", "{model}", "--data", "{text}", "-o", "{tmp}/adapter", "--merge", "{out}", "--quant", "none"],
], ids=["quantize", "quantize --gguf", "export-gguf", "export (checkpoint, no type)", "finetune --merge"])
def test_a_full_disk_is_refused_before_any_work(argv, full_disk, mini_llama_dir, mini_checkpoint, text_file,
                                                tmp_path, probe):
    paths = {"model": mini_llama_dir, "ckpt": mini_checkpoint, "text": text_file, "tmp": tmp_path,
             "out": tmp_path / "out"}
    o = probe([a.format(**paths) for a in [*argv, "--quiet"]], outputs=(paths["out"], tmp_path / "ok"))
    assert f"not enough disk space for {tmp_path}/" in o.err
    assert f"{FREE:,} bytes free" in o.err and "needs about" in o.err


def test_enough_free_space_runs(monkeypatch, mini_llama_dir, tmp_path, probe):
    real = shutil.disk_usage
    seen = []
    monkeypatch.setattr(shutil, "disk_usage", lambda path: seen.append(path) or real(path))
    out = tmp_path / "out"
    probe(["quantize", mini_llama_dir, "-o", out, "--group-size", "32", "--quiet"], expect=0, outputs=(out,))
    assert seen, "the free space was not checked"

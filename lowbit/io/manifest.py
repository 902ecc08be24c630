"""The manifest of a lowbit checkpoint: a SHA-256 of every file that defines the model.

It lives in ``config.json`` as ``quantization_config["manifest"]``:

    {"version": 1, "sha256": {"config.json": "...", "model.safetensors": "...", ...}}

and covers what a loader reads to build the model: ``config.json`` (architecture, recipe, every
layer's scheme), every ``*.safetensors`` file and the index of a sharded save
(``*.safetensors.index.json``, which says which shard holds which tensor). ``config.json`` holds its own manifest, so its
entry hashes the canonical JSON of the config without the manifest (``_canonical``), which also
makes the hash independent of indentation and key order. Tokenizer files, ``generation_config.json``
and the model card stay outside: ``from_pretrained`` on a hub id fetches them apart from the
weights, and they do not change what the weights compute.

Inside ``config.json`` rather than beside it so that every way a checkpoint travels (a hub download
fetches ``config.json`` and the weights, nothing else is certain) carries it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from lowbit.io.config_json import CONFIG_NAME, read_config_json

MANIFEST_VERSION = 1
NO_VERIFY_HINT = "pass --no-verify (verify=False) to load it anyway"


def write_manifest(directory: str | Path) -> dict[str, Any]:
    """Hash ``directory``'s ``config.json``, ``*.safetensors`` and their index, and store the manifest in its
    ``config.json`` (which must have a ``quantization_config``). Call it once every other file is
    written; returns the manifest."""
    directory = Path(directory)
    config = read_config_json(directory)
    manifest = {"version": MANIFEST_VERSION, "sha256": {CONFIG_NAME: _config_sha256(config),
                                                        **{p.name: file_sha256(p) for p in _hashed(directory)}}}
    config["quantization_config"]["manifest"] = manifest
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return manifest


def verify_manifest(directory: str | Path, config: dict[str, Any]) -> None:
    """Check ``directory`` against the manifest in ``config`` (its parsed ``config.json``): every
    listed file present with its recorded SHA-256, and no weights file or index it does not list.

    Raises:
        ValueError: one line naming the file that is missing, extra or differs, and the fix; also
            when the manifest itself is missing or malformed.
    """
    directory = Path(directory)
    qc = config.get("quantization_config")
    manifest = qc.get("manifest") if isinstance(qc, dict) else None
    recorded = manifest.get("sha256") if isinstance(manifest, dict) else None
    if not isinstance(recorded, dict) or manifest.get("version") != MANIFEST_VERSION:
        raise ValueError(f"{directory / CONFIG_NAME} has no valid manifest (quantization_config.manifest, "
                         f"version {MANIFEST_VERSION}), which a checkpoint of this format must have: it was "
                         f"removed or edited; re-create or re-copy the checkpoint, or {NO_VERIFY_HINT}")
    if recorded.get(CONFIG_NAME) != _config_sha256(config):
        raise ValueError(f"{directory / CONFIG_NAME} differs from the checkpoint's manifest (its model or "
                         f"quantization_config was edited); re-create or re-copy the checkpoint, or {NO_VERIFY_HINT}")
    for name in sorted(set(recorded) - {CONFIG_NAME}):
        path = directory / name
        if not path.is_file():
            raise ValueError(f"{path} is missing (the checkpoint's manifest lists it); re-copy the checkpoint")
        if file_sha256(path) != recorded[name]:
            raise ValueError(f"{path} differs from the checkpoint's manifest (SHA-256), so it is corrupt or was "
                             f"changed; re-create or re-copy the checkpoint, or {NO_VERIFY_HINT}")
    extra = [p for p in _hashed(directory) if p.name not in recorded]
    if extra:
        raise ValueError(f"{extra[0]} is not in the checkpoint's manifest, so it was added after lowbit wrote the "
                         f"checkpoint; remove it, or {NO_VERIFY_HINT}")


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 4 MiB chunks (a checkpoint may not fit in memory twice)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _hashed(directory: Path) -> list[Path]:
    """The files besides ``config.json`` that the manifest covers: the weights and a shard index."""
    found = [*directory.glob("*.safetensors"), *directory.glob("*.safetensors.index.json")]
    return sorted(p for p in found if p.is_file())


def _config_sha256(config: dict[str, Any]) -> str:
    return hashlib.sha256(_canonical(config).encode()).hexdigest()


def _canonical(config: dict[str, Any]) -> str:
    """``config`` without its manifest, as JSON with sorted keys and no spaces: the same text for the
    same values however the file was indented or ordered."""
    qc = {k: v for k, v in config.get("quantization_config", {}).items() if k != "manifest"}
    return json.dumps({**config, "quantization_config": qc}, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False)

"""Where a model came from (its name and licence) and the README.md model card every output carries.

A source's licence is read where the source states it, never guessed:

- a ``README.md`` with Hugging Face YAML front matter (``license``, ``license_name``, ``base_model``),
- ``config.json``'s ``license`` field, if a model sets one,
- a GGUF file's ``general.license`` and ``general.name`` (for a demo model pulled from a GGUF, the
  GGUF kept beside its float directory).

The card (``write_model_card``) is Hugging Face's format: YAML front matter with ``license``
(verbatim: not always an SPDX id, e.g. ``gemma``), ``base_model``, ``tags`` and ``quantized_by``,
then the format, the recipe, the command that made it and the measured bits, size, perplexity and
KL that were measured. A source without a licence gets a warning and a card without ``license``.

    origin = model_origin(model)                 # from the directory the model was loaded from
    write_model_card(out_dir, ModelCard(origin, "GPTQ int4 g64", recipe=..., measured={"bits_per_weight": 4.25}))
"""

from __future__ import annotations

import json
import shlex
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CARD_NAME = "README.md"
QUANTIZED_BY = "lowbit"


@dataclass(frozen=True)
class ModelOrigin:
    """The source model: ``name`` (a hub id or the name its file states), ``license`` as the source
    states it (None: it states none), and ``where`` it was read (a path, for the card and for warnings)."""

    name: str | None
    license: str | None
    where: str


@dataclass(frozen=True)
class ModelCard:
    """What a card says beyond the origin.

    Fields:
        origin: the source model's name and licence.
        format: the output format and scheme in a few words, e.g. ``"GPTQ int4 g64 sym"``.
        recipe: the recipe as plain data (``Recipe.to_dict()``), or None.
        command: the command that wrote the output; by default the running ``lowbit`` command, if any.
        measured: measured figures by name (``bits_per_weight``, ``size_bytes``, ``perplexity``, ``kl``);
            only what was measured.
        tags: Hugging Face tags besides ``lowbit`` (``"quantized"``, ``"gptq"``, ``"4-bit"`` ...).
    """

    origin: ModelOrigin
    format: str
    recipe: Mapping[str, Any] | None = None
    command: str | None = None
    measured: Mapping[str, float | int] = field(default_factory=dict)
    tags: tuple[str, ...] = ()


def read_front_matter(text: str) -> dict[str, Any]:
    """The YAML front matter of a Markdown card (``---`` lines around it), or {} when there is none or it
    is not a mapping of valid YAML."""
    lines = text.splitlines()
    if not lines or lines[0].strip() != "---":
        return {}
    try:
        end = next(i for i, line in enumerate(lines[1:], 1) if line.strip() == "---")
        data = yaml.safe_load("\n".join(lines[1:end]))
    except (StopIteration, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _license_of(meta: Mapping[str, Any]) -> str | None:
    """The licence a card or config names: ``license_name`` when ``license`` is HF's ``other``."""
    value = meta.get("license")
    if value == "other" and meta.get("license_name"):
        value = meta["license_name"]
    if isinstance(value, list):
        value = ", ".join(map(str, value))
    return str(value) if value else None


def _base_model_of(meta: Mapping[str, Any]) -> str | None:
    value = meta.get("base_model")
    if isinstance(value, list):
        value = value[0] if value else None
    return str(value) if value else None


def gguf_origin(path: str | Path) -> ModelOrigin:
    """Name and licence from a GGUF file's ``general.*`` metadata."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))

    def text(key: str) -> str | None:
        f = reader.fields.get(key)
        return str(f.contents()) if f is not None else None

    return ModelOrigin(text("general.name"), text("general.license"), str(path))  # verbatim: no hub id is guessed


def origin_of(source: str | Path) -> ModelOrigin:
    """Where the model at ``source`` (a directory, a ``.gguf`` file, or a hub id) came from, read from the
    first place that states a licence: its card, its ``config.json``, the GGUF it was pulled from."""
    path = Path(source)
    if path.is_file() and path.suffix == ".gguf":
        return gguf_origin(path)
    if not path.is_dir():  # a hub id not on disk: its name, licence unknown here
        return ModelOrigin(str(source), None, str(source))
    name = None
    card = path / CARD_NAME
    if card.is_file():
        meta = read_front_matter(card.read_text(errors="replace"))
        name = _base_model_of(meta)
        if _license_of(meta):
            return ModelOrigin(name, _license_of(meta), str(card))
    config = path / "config.json"
    if config.is_file():
        try:
            data = json.loads(config.read_text())
        except ValueError:
            data = {}
        if isinstance(data, dict) and _license_of(data):
            return ModelOrigin(name, _license_of(data), str(config))
    pulled = sorted((path.parent / "gguf").glob("*.gguf"))  # a demo model: hf/ beside the GGUF it came from
    if pulled:
        origin = gguf_origin(pulled[0])
        return ModelOrigin(name or origin.name, origin.license, origin.where)
    return ModelOrigin(name, None, str(path))


def model_origin(model: Any) -> ModelOrigin:
    """``origin_of`` the directory or file ``model`` was loaded from (transformers' ``name_or_path``)."""
    source = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(model, "name_or_path", None)
    if not source:
        return ModelOrigin(None, None, "the model object (no source path recorded)")
    return origin_of(source)


def running_command() -> str | None:
    """The ``lowbit ...`` command line this process runs, or None when lowbit was called from Python."""
    argv0 = Path(sys.argv[0]).as_posix() if sys.argv else ""
    if argv0.endswith(("lowbit/__main__.py", "/lowbit")) or argv0 == "lowbit":
        return shlex.join(["lowbit", *sys.argv[1:]])
    return None


def render_model_card(card: ModelCard) -> str:
    """The card's text: YAML front matter, then the sections."""
    origin = card.origin
    meta: dict[str, Any] = {}
    if origin.license:
        meta["license"] = origin.license
    if origin.name:
        meta["base_model"] = origin.name
    meta["tags"] = ["lowbit", *card.tags]
    meta["quantized_by"] = QUANTIZED_BY
    lines = ["---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip(), "---", "",
             f"# {origin.name or 'model'} ({card.format})", "",
             f"Made with lowbit from `{origin.name or 'an unnamed model'}` (licence read from `{origin.where}`).", "",
             "## Licence", "",
             (f"The source model's licence: `{origin.license}`. This quantized copy is a derivative under the "
              "same terms." if origin.license else
              "The source model states no licence; check its terms before redistributing this copy."), ""]
    command = card.command or running_command()
    if command:
        lines += ["## Command", "", "```", command, "```", ""]
    if card.recipe is not None:
        lines += ["## Recipe", "", "```json", json.dumps(card.recipe, indent=2, sort_keys=True), "```", ""]
    if card.measured:
        lines += ["## Measured", "", "| quantity | value |", "|---|---|"]
        lines += [f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in card.measured.items()]
        lines.append("")
    return "\n".join(lines)


def write_model_card(directory: str | Path, card: ModelCard) -> Path:
    """Write ``README.md`` into ``directory`` (an output being built); warns when the source states no
    licence. Returns the card's path."""
    if not card.origin.license:
        warnings.warn(f"the source model ({card.origin.where}) states no licence; the model card says so "
                      "instead of naming one", stacklevel=2)
    path = Path(directory) / CARD_NAME
    path.write_text(render_model_card(card))
    return path

"""Recipes: which method, and which scheme for which layer, as plain data (YAML or JSON).

A recipe is a default scheme plus ordered overrides by layer-name pattern (first match wins;
``null`` keeps a layer in float) and skip patterns. The same object drives ``quantize``, is stored
in the checkpoint's ``quantization_config``, and will drive export.

    method: rtn
    default: {format: int, bits: 4, granularity: group, group_size: 64, symmetric: false}
    overrides:
      - {pattern: "mlp\\.down_proj", scheme: {format: int, bits: 8, granularity: channel}}
    skip: ["lm_head"]
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lowbit.scheme import QuantScheme, checked_fields

RECIPE_VERSION = 1


@dataclass(frozen=True)
class Override:
    pattern: str  # regular expression searched in the module's full name
    scheme: QuantScheme | None  # None: keep the layer in float

    def __post_init__(self) -> None:
        try:
            re.compile(self.pattern)
        except re.error as e:
            raise ValueError(f"recipe pattern {self.pattern!r} is not a valid regular expression: {e}") from None


@dataclass(frozen=True)
class Recipe:
    method: str = "rtn"
    default: QuantScheme = field(default_factory=QuantScheme)
    overrides: tuple[Override, ...] = ()
    # The output projection is kept in float by default, as GPTQ and bitsandbytes do: it is the
    # layer most sensitive to quantization and often tied to the embedding.
    skip: tuple[str, ...] = ("lm_head",)

    def scheme_for(self, name: str) -> QuantScheme | None:
        """The scheme of the linear layer called ``name``, or None to keep it in float."""
        if any(re.search(p, name) for p in self.skip):
            return None
        for o in self.overrides:
            if re.search(o.pattern, name):
                return o.scheme
        return self.default

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": RECIPE_VERSION,
            "method": self.method,
            "default": self.default.to_dict(),
            "overrides": [{"pattern": o.pattern, "scheme": None if o.scheme is None else o.scheme.to_dict()}
                          for o in self.overrides],
            "skip": list(self.skip),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Recipe:
        d = checked_fields(d, "recipe", RECIPE_VERSION, {"method", "default", "overrides", "skip"})
        overrides = tuple(
            Override(o["pattern"], None if o.get("scheme") is None else QuantScheme.from_dict(o["scheme"]))
            for o in d.get("overrides", ()))
        return cls(
            method=d.get("method", "rtn"),
            default=QuantScheme.from_dict(d.get("default", {})),
            overrides=overrides,
            skip=tuple(d.get("skip", ("lm_head",))),
        )

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        """Read a recipe from a YAML or JSON file (JSON is YAML, so one parser reads both)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"recipe file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ValueError(f"recipe file {path} is not valid YAML/JSON: {str(e).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise ValueError(f"recipe file {path} must hold a mapping with keys method, default, overrides, skip")
        return cls.from_dict(data)

    def dumps(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

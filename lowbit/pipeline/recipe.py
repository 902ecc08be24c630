"""Recipes: which method, and which scheme for which layer, as plain data (YAML or JSON).

A recipe is a default scheme plus ordered overrides by layer-name pattern (first match wins;
``null`` keeps a layer in float) and skip patterns. The same object drives ``quantize``, is stored
in the checkpoint's ``quantization_config``, and will drive export.

    method: rtn
    default: {format: int, bits: 4, granularity: group, group_size: 64, symmetric: false}
    overrides:
      - {pattern: "mlp\\.down_proj", scheme: {format: int, bits: 8, granularity: channel}}
    skip: ["lm_head"]
    group_fallback: error   # or channel | divisor | float, for layers the group size does not divide
    activations: {format: int8, dynamic: false, granularity: tensor, observer: percentile}  # W8A8; omit: weight-only
    rotation: hadamard      # rotate the float model first (lowbit.methods.rotation); omit: no rotation
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from lowbit.act_scheme import ActScheme
from lowbit.scheme import Granularity, QuantScheme, checked_fields

RECIPE_VERSION = 1

# What a layer gets when its scheme's group size does not divide its input size.
GROUP_FALLBACKS = {
    "error": "refuse, listing the group sizes that divide",
    "channel": "one scale per output channel instead",
    "divisor": "the largest group size below the requested one that divides",
    "float": "keep the layer in float",
}


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
    group_fallback: str = "error"  # a key of GROUP_FALLBACKS
    activations: ActScheme | None = None  # None: weight-only; else W8A8 (``lowbit.act_scheme``)
    rotation: str | None = None  # "hadamard": QuaRot-style rotation before quantizing; None: none

    def __post_init__(self) -> None:
        if self.group_fallback not in GROUP_FALLBACKS:
            raise ValueError(f"unknown group_fallback {self.group_fallback!r}; valid: {', '.join(GROUP_FALLBACKS)}")
        if self.rotation not in (None, "hadamard"):
            raise ValueError(f"unknown rotation {self.rotation!r}; valid: hadamard (or omit it)")

    def scheme_for(self, name: str) -> QuantScheme | None:
        """The scheme of the linear layer called ``name``, or None to keep it in float."""
        if any(re.search(p, name) for p in self.skip):
            return None
        for o in self.overrides:
            if re.search(o.pattern, name):
                return o.scheme
        return self.default

    def scheme_for_layer(self, name: str, in_features: int) -> tuple[QuantScheme | None, str | None]:
        """``(scheme, note)`` for a layer with ``in_features`` inputs, after ``group_fallback``.

        ``note`` says what fell back (None when the scheme fits as asked).

        Raises:
            ValueError: the group size does not divide ``in_features`` and ``group_fallback`` is "error".
        """
        scheme = self.scheme_for(name)
        if scheme is None or scheme.granularity is not Granularity.GROUP or in_features % scheme.group_size == 0:
            return scheme, None
        if self.group_fallback == "error":
            try:
                scheme.group_length(in_features, name)
            except ValueError as e:
                raise ValueError(f"{e}, or let such layers fall back with --group-fallback "
                                 "channel|divisor|float") from None
        if self.group_fallback == "float":
            return None, f"{name}: group size {scheme.group_size} does not divide {in_features}; kept in float"
        if self.group_fallback == "channel":
            fallback = replace(scheme, granularity=Granularity.CHANNEL, group_size=None)
        else:
            size = max(d for d in range(1, scheme.group_size) if in_features % d == 0)
            fallback = replace(scheme, group_size=size)
        return fallback, (f"{name}: group size {scheme.group_size} does not divide {in_features}; "
                          f"using {fallback.describe()}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": RECIPE_VERSION,
            "method": self.method,
            "default": self.default.to_dict(),
            "overrides": [{"pattern": o.pattern, "scheme": None if o.scheme is None else o.scheme.to_dict()}
                          for o in self.overrides],
            "skip": list(self.skip),
            "group_fallback": self.group_fallback,
            "activations": None if self.activations is None else self.activations.to_dict(),
        } | ({} if self.rotation is None else {"rotation": self.rotation})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Recipe:
        d = checked_fields(d, "recipe", RECIPE_VERSION, {"method", "default", "overrides", "skip", "group_fallback",
                                                             "activations", "rotation"})
        overrides = tuple(
            Override(o["pattern"], None if o.get("scheme") is None else QuantScheme.from_dict(o["scheme"]))
            for o in d.get("overrides", ()))
        return cls(
            method=d.get("method", "rtn"),
            default=QuantScheme.from_dict(d.get("default", {})),
            overrides=overrides,
            skip=tuple(d.get("skip", ("lm_head",))),
            group_fallback=d.get("group_fallback", "error"),
            activations=None if d.get("activations") is None else ActScheme.from_dict(d["activations"]),
            rotation=d.get("rotation"),
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

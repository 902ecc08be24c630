"""Recipes: which method, which transforms, and which scheme for which layer, as plain data (YAML or JSON).

A recipe is a method with its config, the transforms applied before it (each with its config), a
default scheme plus ordered overrides by layer-name pattern (first match wins; ``null`` keeps a
layer in float) and skip patterns. The same object drives ``quantize``, is stored in the
checkpoint's ``quantization_config``, and will drive export.

    method: gptq
    method_config: {damp: 0.01, act_order: true}     # omit: the method's defaults
    transforms: [{name: smoothquant, config: {alpha: 0.5}}]   # or [smoothquant]; omit: see below
    default: {format: int, bits: 4, granularity: group, group_size: 64, symmetric: false}
    overrides:
      - {pattern: "mlp\\.down_proj", scheme: {format: int, bits: 8, granularity: channel}}
      - {pattern: "self_attn\\.k_proj", scheme: {format: int, bits: 4, group_size: 64}, method: rtn}  # a method per layer
    skip: ["lm_head"]
    group_fallback: error   # or channel | divisor | float, for layers the group size does not divide
    activations: {format: int8, dynamic: false, granularity: tensor, observer: percentile}  # W8A8; omit: weight-only
    holdout: {every: 4, candidates: [rtn, {method: gptq, config: {damp: 0.1}}]}  # omit: no held-out choice

An override's ``method`` (with its ``method_config``) replaces the recipe's for the layers it matches;
the block driver collects the statistics of every method the recipe names. ``holdout``: each linear
no override pins a method for chooses between the recipe's method and the candidates on held-out
calibration windows (``lowbit.pipeline.holdout``); ``pinned_recipe`` records the choices.

A recipe without a ``transforms`` list (every recipe lowbit wrote before transforms had a table)
reads its method as a shorthand (``method_shorthand``: ``awq+gptq``, ``smoothquant``, ``awq`` ...)
and ``rotation: hadamard`` as the ``hadamard`` transform.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from lowbit.act_scheme import ActScheme
from lowbit.methods import METHODS, TRANSFORMS, Statistic, TransformKind, get_method, get_transform
from lowbit.methods.registry import check_config, config_from_dict, config_or_default, config_to_dict
from lowbit.methods.transforms import check_composition
from lowbit.pipeline.holdout import HoldOut, MethodChoice
from lowbit.scheme import Granularity, QuantScheme, checked_fields

RECIPE_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: method shorthands and ``rotation``, no transforms list

# Method names that also imply transforms (what ``--method awq`` has always meant).
SHORTHANDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "awq": ("awq", ("awq",)),  # AWQ's scales, then its clipping search
    "smoothquant": ("rtn", ("smoothquant",)),
}


def method_shorthands() -> list[str]:
    """Every name ``method_shorthand`` reads: the methods, ``SHORTHANDS``, and ``scaling+method`` for
    each channel-scaling transform and method of the tables."""
    scalings = [t.name for t in TRANSFORMS.values() if t.kind is TransformKind.CHANNEL_SCALING]
    names = [*METHODS, *(n for n in SHORTHANDS if n not in METHODS)]
    return names + [f"{t}+{m}" for t in scalings for m in METHODS]


def method_shorthand(spec: str) -> tuple[str, tuple[str, ...]]:
    """``(method, transforms)`` that the one-word method ``spec`` stands for (``"awq+gptq"`` ->
    ``("gptq", ("awq",))``), as the CLI's ``--method`` and recipes without a transforms list read it."""
    if spec in SHORTHANDS:
        return SHORTHANDS[spec]
    if spec in METHODS:
        return spec, ()
    transform, plus, method = str(spec).partition("+")
    if plus and method in METHODS and transform in TRANSFORMS and \
            TRANSFORMS[transform].kind is TransformKind.CHANNEL_SCALING:
        return method, (transform,)
    raise ValueError(f"unknown method {spec!r}; valid: {', '.join(method_shorthands())}")


@dataclass(frozen=True)
class TransformStep:
    """One transform of a recipe: its name in ``TRANSFORMS`` and its config (None: the defaults)."""

    name: str
    config: Any = None

    def __post_init__(self) -> None:
        entry = get_transform(self.name)
        object.__setattr__(self, "config", config_or_default(entry, self.config))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "config": config_to_dict(self.config)}

    @classmethod
    def from_dict(cls, d: str | dict[str, Any]) -> TransformStep:
        if isinstance(d, str):
            return cls(d)
        if not isinstance(d, dict) or set(d) - {"name", "config"} or "name" not in d:
            raise ValueError(f"a recipe transform is a name or {{name: ..., config: {{...}}}}, got {d!r}")
        return cls(d["name"], config_from_dict(get_transform(d["name"]), d.get("config")))

# What a layer gets when its scheme's group size does not divide its input size.
GROUP_FALLBACKS = {
    "error": "refuse, listing the group sizes that divide",
    "channel": "one scale per output channel instead",
    "divisor": "the largest group size below the requested one that divides",
    "float": "keep the layer in float",
}


@dataclass(frozen=True)
class Override:
    """Layers whose name matches ``pattern`` get ``scheme`` (None: kept in float) and, when ``method``
    is set, that method of the table with ``method_config`` (None: its defaults, or the recipe's
    config when it is the recipe's method) instead of the recipe's."""

    pattern: str  # regular expression searched in the module's full name
    scheme: QuantScheme | None  # None: keep the layer in float
    method: str | None = None  # None: the recipe's method
    method_config: Any = None

    def __post_init__(self) -> None:
        _check_pattern(self.pattern, "recipe pattern")
        if self.method is None:
            if self.method_config is not None:
                raise ValueError(f"override {self.pattern!r} has a method_config but no method; name the method")
            return
        if self.method not in METHODS:
            _refuse_shorthand(self.method)
        entry = get_method(self.method)
        if self.method_config is not None:
            check_config(entry, self.method_config)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"pattern": self.pattern, "scheme": None if self.scheme is None else self.scheme.to_dict()}
        if self.method is not None:
            d["method"] = self.method
            if self.method_config is not None:
                d["method_config"] = config_to_dict(self.method_config)
        return d

    @classmethod
    def from_dict(cls, d: Any) -> Override:
        """An override as a recipe file writes it: ``{pattern: REGEX, scheme: {...} or null}``, optionally
        with ``method: NAME`` and ``method_config: {...}``."""
        if not isinstance(d, dict) or "pattern" not in d or set(d) - {"pattern", "scheme", "method", "method_config"}:
            raise ValueError("a recipe override is {pattern: REGEX, scheme: {...} or null, method: NAME (optional), "
                             f"method_config: {{...}} (optional)}}, got {d!r}")
        method = d.get("method")
        config = None
        if d.get("method_config") is not None:
            if method is None:
                raise ValueError(f"override {d['pattern']!r} has a method_config but no method; name the method")
            config = config_from_dict(get_method(method), d["method_config"])
        return cls(d["pattern"], None if d.get("scheme") is None else QuantScheme.from_dict(d["scheme"]),
                   method, config)


@dataclass(frozen=True)
class Recipe:
    """See the module docstring. ``method_config`` None means the method's defaults; ``transforms``
    takes names or ``TransformStep``s (names get their defaults); both are filled in on creation."""

    method: str = "rtn"
    method_config: Any = None
    transforms: tuple[TransformStep, ...] = ()
    default: QuantScheme = field(default_factory=QuantScheme)
    overrides: tuple[Override, ...] = ()
    # The output projection is kept in float by default, as GPTQ and bitsandbytes do: it is the
    # layer most sensitive to quantization and often tied to the embedding.
    skip: tuple[str, ...] = ("lm_head",)
    group_fallback: str = "error"  # a key of GROUP_FALLBACKS
    activations: ActScheme | None = None  # None: weight-only; else W8A8 (``lowbit.act_scheme``)
    holdout: HoldOut | None = None  # choose each linear's method on held-out windows (``lowbit.pipeline.holdout``)

    def __post_init__(self) -> None:
        if not isinstance(self.skip, tuple) or not all(isinstance(p, str) for p in self.skip):
            raise TypeError(f"recipe skip is a list of regular expressions, got {self.skip!r}")
        for pattern in self.skip:
            _check_pattern(pattern, "skip pattern")
        if self.group_fallback not in GROUP_FALLBACKS:
            raise ValueError(f"unknown group_fallback {self.group_fallback!r}; valid: {', '.join(GROUP_FALLBACKS)}")
        if self.method not in METHODS:
            _refuse_shorthand(self.method)
        entry = get_method(self.method)
        object.__setattr__(self, "method_config", config_or_default(entry, self.method_config))
        steps = tuple(t if isinstance(t, TransformStep) else TransformStep(t) for t in self.transforms)
        object.__setattr__(self, "transforms", steps)
        check_composition([t.name for t in steps], self.method)
        scalings = [t.name for t in steps if get_transform(t.name).kind is TransformKind.CHANNEL_SCALING]
        others = [*(o.method for o in self.overrides if o.method is not None),
                  *(c.method for c in (self.holdout.candidates if self.holdout is not None else ()))]
        for name in others:
            if scalings and Statistic.FISHER in get_method(name).statistics:
                raise ValueError(f"{name} weighs each weight by its Fisher, computed on the float model before any "
                                 f"scale is folded in; it does not compose with {', '.join(scalings)} (drop the "
                                 "transform or the per-layer method)")

    def method_for(self, name: str) -> MethodChoice:
        """The method (and config) of the linear called ``name``: its first matching override's when that
        names one, else the recipe's."""
        return self.pinned_method(name) or MethodChoice(self.method, self.method_config)

    def pinned_method(self, name: str) -> MethodChoice | None:
        """The method the first override matching ``name`` names (None: none matches or it names none)."""
        for o in self.overrides:
            if re.search(o.pattern, name):
                if o.method is None:
                    return None
                config = o.method_config
                if config is None and o.method == self.method:
                    config = self.method_config
                return MethodChoice(o.method, config)
        return None

    def methods(self) -> list[MethodChoice]:
        """Every method the recipe may run: its own, its overrides', its held-out candidates'."""
        found = [MethodChoice(self.method, self.method_config)]
        found += [MethodChoice(o.method, o.method_config) for o in self.overrides if o.method is not None]
        found += list(self.holdout.candidates) if self.holdout is not None else []
        return found

    @property
    def rotation(self) -> str | None:
        """The name of the recipe's rotation transform, or None when it rotates nothing."""
        return next((t.name for t in self.transforms if get_transform(t.name).kind is TransformKind.ROTATION), None)

    def describe_method(self) -> str:
        """``transform+...+method`` (``smoothquant+gptq``), or the shorthand that says it (``awq``)."""
        names = tuple(t.name for t in self.transforms)
        short = next((k for k, v in SHORTHANDS.items() if v == (self.method, names)), None)
        return short or "+".join([*names, self.method])

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
            "method_config": config_to_dict(self.method_config),
            "transforms": [t.to_dict() for t in self.transforms],
            "default": self.default.to_dict(),
            "overrides": [o.to_dict() for o in self.overrides],
            "skip": list(self.skip),
            "group_fallback": self.group_fallback,
            "activations": None if self.activations is None else self.activations.to_dict(),
            **({"holdout": self.holdout.to_dict()} if self.holdout is not None else {}),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Recipe:
        version = d.get("version", RECIPE_VERSION)
        d = checked_fields(d, "recipe", version if version in READABLE_VERSIONS else RECIPE_VERSION,
                           {"method", "method_config", "transforms", "default", "overrides", "skip", "group_fallback",
                            "activations", "rotation", "holdout"})
        method, transforms = _method_and_transforms(d)
        overrides = d.get("overrides", ())
        if not isinstance(overrides, (list, tuple)):
            raise TypeError(f"recipe overrides is a list of {{pattern: ..., scheme: ...}}, got {overrides!r}")
        return cls(
            method=method,
            method_config=config_from_dict(get_method(method), d.get("method_config")),
            transforms=transforms,
            default=QuantScheme.from_dict(d.get("default", {})),
            overrides=tuple(map(Override.from_dict, overrides)),
            skip=_tuple_if_list(d.get("skip", ("lm_head",))),
            group_fallback=d.get("group_fallback", "error"),
            activations=None if d.get("activations") is None else ActScheme.from_dict(d["activations"]),
            holdout=None if d.get("holdout") is None else HoldOut.from_dict(d["holdout"]),
        )

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        """Read a recipe from a YAML or JSON file (JSON is YAML, so one parser reads both)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"recipe file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"recipe file {path} is not UTF-8 text (byte {e.start})") from None
        except yaml.YAMLError as e:
            raise ValueError(f"recipe file {path} is not valid YAML/JSON: {str(e).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise ValueError(f"recipe file {path} must hold a mapping with keys method, default, overrides, skip")
        return cls.from_dict(data)

    def dumps(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def pinned_recipe(recipe: Recipe, chosen: dict[str, MethodChoice], schemes: dict[str, QuantScheme]) -> Recipe:
    """``recipe`` with one exact-name override first for each linear in ``chosen`` (full name -> the
    method it got, e.g. by the held-out choice) pinning that method and its scheme (``schemes``): the
    recipe to store with the checkpoint, which makes the same choices when run again."""
    pins = tuple(Override(exact_pattern(name), schemes[name], c.method, c.config) for name, c in sorted(chosen.items()))
    return replace(recipe, overrides=pins + recipe.overrides)


def exact_pattern(name: str) -> str:
    """The recipe pattern that matches the module called ``name`` and no other."""
    return f"^{re.escape(name)}$"


def recipe_describing(schemes: dict[str, QuantScheme | None]) -> Recipe:
    """A plain RTN recipe that gives every linear named in ``schemes`` its scheme (None: float): the
    most common scheme as the default, one exact-name override for each other linear, nothing
    skipped by pattern. It records what a model read from a pre-quantized file (GPTQ, AWQ,
    compressed-tensors, bitsandbytes, GGUF) holds, whose codes no lowbit recipe made; run on the float
    model, it re-makes the same schemes with RTN.

    Raises:
        ValueError: no linear in ``schemes`` is quantized.
    """
    quantized = [s for s in schemes.values() if s is not None]
    if not quantized:
        raise ValueError("the model has no quantized linear layers to describe")
    default = max(set(quantized), key=lambda s: (quantized.count(s), s.describe()))
    overrides = tuple(Override(exact_pattern(name), scheme) for name, scheme in sorted(schemes.items())
                      if scheme != default)
    return Recipe(method="rtn", default=default, overrides=overrides, skip=())


def _tuple_if_list(value: Any) -> Any:
    """A YAML list as the tuple a frozen recipe holds; anything else as it is, for the field's check to refuse."""
    return tuple(value) if isinstance(value, list) else value


def _check_pattern(pattern: Any, what: str) -> None:
    """Refuse a layer-name pattern that is not a string holding a valid regular expression."""
    if not isinstance(pattern, str):
        raise TypeError(f"{what} must be a regular expression string, got {pattern!r} ({type(pattern).__name__})")
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{what} {pattern!r} is not a valid regular expression: {e}") from None


def _refuse_shorthand(spec: str) -> None:
    """A shorthand given where a method name belongs: say how to spell it (else ``get_method`` refuses)."""
    try:
        method, transforms = method_shorthand(spec)
    except ValueError:
        return
    raise ValueError(f"method {spec!r} is a shorthand: write method={method!r}, transforms={transforms!r} "
                     f"(or Recipe.from_dict({{'method': {spec!r}}}))")


def _method_and_transforms(d: dict[str, Any]) -> tuple[str, tuple[TransformStep, ...]]:
    """The method and transforms a recipe dict names: literally with a ``transforms`` list, else its
    method read as a shorthand; ``rotation: hadamard`` adds that transform first either way."""
    method = d.get("method", "rtn")
    if "transforms" in d:
        get_method(method)
        listed = d["transforms"] or []
        if not isinstance(listed, list):
            raise ValueError(f"recipe transforms must be a list, got {listed!r}")
        transforms = tuple(TransformStep.from_dict(t) for t in listed)
    else:
        method, implied = method_shorthand(method)
        transforms = tuple(TransformStep(t) for t in implied)
    rotation = d.get("rotation")
    if rotation is not None:
        if rotation != "hadamard":
            raise ValueError(f"unknown rotation {rotation!r}; valid: hadamard (or omit it)")
        transforms = (TransformStep("hadamard"), *transforms)
    return method, transforms

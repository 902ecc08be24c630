"""``QuantScheme``: everything that says how one weight matrix is quantized, as plain data.

A scheme is what a recipe assigns to a layer, what a checkpoint records per layer, and what gives
a ``QuantizedWeight``'s codes their meaning. Validation happens here, once, so that every path
(CLI, Python API, recipe file, checkpoint) rejects the same bad combinations with the same message.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any

from lowbit.formats import FormatName, NumberFormat, make_format
from lowbit.observers import Observer


class Granularity(str, Enum):
    """How many weights share one scale: the whole tensor, one output row, or a group of a row."""

    TENSOR = "tensor"
    CHANNEL = "channel"
    GROUP = "group"


class ZeroPoint(str, Enum):
    """Where an asymmetric grid's offset lives.

    INT: an integer on the code grid, ``w' = s (q - z)`` (the seeds' affine formula; GPTQ's layout).
    FLOAT: a float minimum, ``w' = s q + m`` (llama.cpp Q4_1, HQQ); it can sit between grid points.
    """

    INT = "int"
    FLOAT = "float"


OBSERVERS = tuple(o.value for o in Observer)
SCHEME_VERSION = 1


@dataclass(frozen=True)
class QuantScheme:
    """How to quantize one weight matrix ``[out_features, in_features]``.

    Groups run along the input dimension, so a group never straddles two output rows and a
    dequantized row needs only its own scales.
    """

    format: FormatName = FormatName.INT
    bits: int = 4
    granularity: Granularity = Granularity.GROUP
    group_size: int | None = 64  # 64 divides the hidden sizes of the demo models (576, 640); 128 does not
    symmetric: bool = True
    zero_point: ZeroPoint = ZeroPoint.INT  # only read when symmetric is False
    observer: str = "minmax"
    double_quant: bool = False  # QLoRA: store the scales in 8 bits, blocks of 256

    def __post_init__(self) -> None:
        object.__setattr__(self, "format", _enum(FormatName, self.format, "format"))
        object.__setattr__(self, "granularity", _enum(Granularity, self.granularity, "granularity"))
        object.__setattr__(self, "zero_point", _enum(ZeroPoint, self.zero_point, "zero point"))
        self.number_format()  # raises on a bits/symmetry combination the format lacks
        if self.granularity is Granularity.GROUP:
            if self.group_size is None or self.group_size <= 0:
                raise ValueError(f"group quantization needs a positive group size, got {self.group_size!r}")
        elif self.group_size is not None:
            object.__setattr__(self, "group_size", None)
        if self.observer not in OBSERVERS:
            raise ValueError(f"unknown observer {self.observer!r}; valid observers: {', '.join(OBSERVERS)}")

    def number_format(self) -> NumberFormat:
        """The grid this scheme's codes index."""
        return make_format(self.format, self.bits, self.symmetric)

    @property
    def has_zero(self) -> bool:
        return not self.symmetric

    def group_length(self, in_features: int, layer: str = "weight") -> int:
        """Weights per scale along the input dimension.

        Raises:
            ValueError: the group size does not divide ``in_features``; the message lists divisors.
        """
        if self.granularity is not Granularity.GROUP:
            return in_features
        assert self.group_size is not None
        if in_features % self.group_size:
            options = [g for g in (16, 32, 64, 96, 128, 192, 256) if in_features % g == 0]
            hint = f"use one of {options} or --per-channel" if options else "use --per-channel"
            raise ValueError(
                f"group size {self.group_size} does not divide in_features={in_features} of {layer}; {hint}"
            )
        return self.group_size

    def describe(self) -> str:
        """Short human label, e.g. ``int4 g64 asym`` or ``nf4 g64 dq``."""
        name = f"{self.format.value}{self.bits}" if self.format is FormatName.INT else self.format.value
        gran = {Granularity.TENSOR: "per-tensor", Granularity.CHANNEL: "per-channel"}.get(
            self.granularity, f"g{self.group_size}")
        parts = [name, gran]
        if not self.symmetric:
            parts.append("asym" if self.zero_point is ZeroPoint.INT else "asym-fmin")
        if self.double_quant:
            parts.append("dq")
        return " ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("format", "granularity", "zero_point"):
            d[key] = d[key].value
        d["version"] = SCHEME_VERSION
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantScheme:
        return cls(**checked_fields(d, "scheme", SCHEME_VERSION, set(cls.__dataclass_fields__)))


def checked_fields(d: dict[str, Any], what: str, version: int, valid: set[str]) -> dict[str, Any]:
    """``d`` without its ``version`` key, after checking the version and that every key is known."""
    d = dict(d)
    found = d.pop("version", version)
    if found != version:
        raise ValueError(f"{what} version {found} is not supported (this lowbit reads {version})")
    unknown = set(d) - valid
    if unknown:
        raise ValueError(f"unknown {what} keys {sorted(unknown)}; valid: {', '.join(sorted(valid))}")
    return d


def _enum(kind: type[Enum], value: Any, what: str) -> Any:
    try:
        return kind(value)
    except ValueError:
        valid = ", ".join(str(m.value) for m in kind)
        raise ValueError(f"unknown {what} {value!r}; valid: {valid}") from None

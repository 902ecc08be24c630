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
    # Extensions; a scheme at their defaults records none of them (``to_dict``).
    vector_dim: int | None = None  # vq: weights one code stands for, along the input dimension
    super_group: int | None = None  # two-level scales: groups per super-block (llama.cpp's K types: 8 or 16)
    sub_scale_bits: int | None = None  # two-level scales: bits of each group's scale (and minimum) code
    # two-level scales: codes are offset binary, scale = super * (code - 2**(bits-1)) (Q3_K, Q6_K, IQ4_XS)
    sub_scale_signed: bool = False
    group_index: bool = False  # column -> group from a stored index (``g_idx``, GPTQ act-order without static groups)
    sparse: bool = False  # a sparse part of exact values (outliers) is added to the dense codes
    shared_codebook: bool = False  # vq: every output row shares its group's codebook (product quantization)
    float32_scales: bool = False  # one-level scales in float32, not float16 (bitsandbytes' absmax, read as is)

    def __post_init__(self) -> None:
        if not isinstance(self.format, str):
            raise TypeError(f"scheme field format must be a format name, got {self.format!r} ({type(self.format).__name__})")
        object.__setattr__(self, "format", FormatName(self.format))
        object.__setattr__(self, "granularity", _enum(Granularity, self.granularity, "granularity"))
        object.__setattr__(self, "zero_point", _enum(ZeroPoint, self.zero_point, "zero point"))
        check_field_types(self, FIELD_TYPES, "scheme")
        if self.symmetric and self.zero_point is ZeroPoint.FLOAT:
            raise ValueError("zero_point float is the float minimum of an asymmetric scheme; a symmetric scheme has "
                             "no zero-point (add --asym / symmetric: false, or drop --zero-point)")
        self.number_format()  # raises on a bits/symmetry combination the format lacks
        if self.granularity is Granularity.GROUP:
            if self.group_size is None or self.group_size <= 0:
                raise ValueError(f"group quantization needs a positive group size, got {self.group_size!r}")
        elif self.group_size is not None:
            object.__setattr__(self, "group_size", None)
        if self.observer not in OBSERVERS:
            raise ValueError(f"unknown observer {self.observer!r}; valid observers: {', '.join(OBSERVERS)}")
        self._check_extensions()

    def _check_extensions(self) -> None:
        """Refuse combinations of codebooks, two-level scales, group index and grids that mean nothing."""
        codebook = self.format in (FormatName.LUT, FormatName.VQ)
        if codebook and (self.double_quant or self.super_group is not None or not self.symmetric):
            raise ValueError(f"{self.format.value} codes index a codebook: no scales to double-quantize, "
                             "no two-level scales and no zero-point (drop --double-quant/--asym)")
        if (self.format is FormatName.VQ) != (self.vector_dim is not None):
            raise ValueError("vector_dim is required by format vq and only by it (e.g. --format vq --vector-dim 4)")
        if self.vector_dim is not None:
            if self.vector_dim < 1:
                raise ValueError(f"vector_dim must be >= 1, got {self.vector_dim}")
            if self.group_size is not None and self.group_size % self.vector_dim:
                raise ValueError(f"group size {self.group_size} is not a multiple of vector_dim {self.vector_dim}")
        if self.shared_codebook and (self.format is not FormatName.VQ or self.granularity is not Granularity.GROUP):
            raise ValueError("shared_codebook (product quantization: one codebook per slice of group_size input "
                             "columns, shared by every row) needs format vq and group granularity")
        if (self.super_group is None) != (self.sub_scale_bits is None):
            raise ValueError("two-level scales need both super_group and sub_scale_bits (llama.cpp Q4_K: 8 and 6)")
        if self.sub_scale_signed and (self.super_group is None or not self.symmetric):
            raise ValueError("signed sub-scale codes (llama.cpp Q3_K, Q6_K, IQ4_XS) belong to two-level scales of a "
                             "symmetric scheme: they need super_group and sub_scale_bits and no zero-point")
        if self.super_group is not None:
            if self.granularity is not Granularity.GROUP or self.double_quant:
                raise ValueError("two-level scales split a row's groups into super-blocks: they need group "
                                 "granularity and exclude double quantization")
            if self.super_group < 2 or not 2 <= self.sub_scale_bits <= 8:
                raise ValueError(f"two-level scales need super_group >= 2 and sub_scale_bits in 2..8, got "
                                 f"{self.super_group} and {self.sub_scale_bits}")
            if not self.symmetric and self.zero_point is not ZeroPoint.FLOAT:
                raise ValueError("two-level asymmetric scales store float minimums (zero_point float), "
                                 "as llama.cpp's K types do")
        if self.float32_scales and (self.is_codebook or self.double_quant or self.super_group is not None):
            raise ValueError("float32_scales keeps plain one-level scales in float32: not for codebooks, double-"
                             "quantized or two-level scales")
        if self.group_index and self.granularity is not Granularity.GROUP:
            raise ValueError("a group index (g_idx) maps columns to groups: it needs group granularity")

    @property
    def is_codebook(self) -> bool:
        """Whether codes index a codebook stored with the weight (``lut``, ``vq``) instead of a fixed grid."""
        return self.format in (FormatName.LUT, FormatName.VQ)

    @property
    def weights_per_code(self) -> int:
        """Weights one code stands for: ``vector_dim`` for vq, else 1."""
        return self.vector_dim or 1

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
        numbered = (FormatName.INT, FormatName.LUT, FormatName.VQ)
        name = f"{self.format.value}{self.bits}" if self.format in numbered else self.format.value
        if self.vector_dim is not None:
            name += f" d{self.vector_dim}"
        if self.shared_codebook:
            name += " pq"
        gran = {Granularity.TENSOR: "per-tensor", Granularity.CHANNEL: "per-channel"}.get(
            self.granularity, f"g{self.group_size}")
        parts = [name, gran]
        if not self.symmetric:
            parts.append("asym" if self.zero_point is ZeroPoint.INT else "asym-fmin")
        if self.double_quant:
            parts.append("dq")
        if self.super_group is not None:
            signed = " signed" if self.sub_scale_signed else ""
            parts.append(f"2-level x{self.super_group} s{self.sub_scale_bits}{signed}")
        if self.group_index:
            parts.append("g_idx")
        if self.float32_scales:
            parts.append("fp32-scales")
        if self.sparse:
            parts.append("+sparse")
        return " ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("format", "granularity", "zero_point"):
            d[key] = d[key].value
        for key in EXTENSION_FIELDS:  # schemes without extensions read as they did before them
            if d[key] == QuantScheme.__dataclass_fields__[key].default:
                del d[key]
        d["version"] = SCHEME_VERSION
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantScheme:
        """The scheme ``to_dict`` wrote (or a recipe file states).

        Raises:
            TypeError: ``d`` is not a mapping, or a field has the wrong type.
            ValueError: an unknown key or version, or values no scheme has.
        """
        return cls(**checked_fields(d, "scheme", SCHEME_VERSION, set(cls.__dataclass_fields__)))


# The type of every field that is not an enum, checked before any value is used: a recipe file's
# ``bits: 4.5`` or ``group_size: "64"`` would otherwise be accepted, or fail deep inside a format.
# (type, None allowed)
FIELD_TYPES: dict[str, tuple[type, bool]] = {
    "bits": (int, False), "group_size": (int, True), "symmetric": (bool, False), "observer": (str, False),
    "double_quant": (bool, False), "vector_dim": (int, True), "super_group": (int, True),
    "sub_scale_bits": (int, True), "sub_scale_signed": (bool, False), "group_index": (bool, False),
    "sparse": (bool, False), "shared_codebook": (bool, False), "float32_scales": (bool, False),
}


def check_field_types(obj: Any, types: dict[str, tuple[type, bool]], what: str) -> None:
    """Refuse a field of ``obj`` whose value is not of its type in ``types`` (a bool is not an int,
    and neither is a float with an integral value).

    Raises:
        TypeError: naming ``what``, the field, the expected type and the value.
    """
    for name, (kind, optional) in types.items():
        value = getattr(obj, name)
        if (value is None and optional) or (isinstance(value, kind) and (kind is bool or not isinstance(value, bool))):
            continue
        expected = kind.__name__ + (" or None" if optional else "")
        raise TypeError(f"{what} field {name} must be {expected}, got {value!r} ({type(value).__name__})")


EXTENSION_FIELDS = ("vector_dim", "super_group", "sub_scale_bits", "sub_scale_signed", "group_index", "sparse",
                    "shared_codebook", "float32_scales")


def checked_fields(d: dict[str, Any], what: str, version: int, valid: set[str]) -> dict[str, Any]:
    """``d`` without its ``version`` key, after checking it is a mapping, the version and that every key is known."""
    if not isinstance(d, dict):
        raise TypeError(f"a {what} is a mapping of its fields, got {d!r} ({type(d).__name__})")
    d = dict(d)
    found = d.pop("version", version)
    if found != version:
        raise ValueError(f"{what} version {found} is not supported (this lowbit reads {version})")
    unknown = set(d) - valid
    if unknown:
        raise ValueError(f"unknown {what} keys {sorted(map(str, unknown))}; valid: {', '.join(sorted(valid))}")
    return d


def _enum(kind: type[Enum], value: Any, what: str) -> Any:
    try:
        return kind(value)
    except (ValueError, TypeError):
        valid = ", ".join(str(m.value) for m in kind)
        raise ValueError(f"unknown {what} {value!r}; valid: {valid}") from None

"""The contract every number format fulfils, and the registry that names them.

A number format is a finite grid of representable values addressed by unsigned integer codes in
``[0, 2**bits)``. It knows nothing of scales, groups or modules: a quantizer divides a weight by its
scale, asks the format for the nearest codes, and multiplies back after ``decode``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from functools import cached_property, lru_cache
from typing import Callable, ClassVar

import torch
from torch import Tensor

from lowbit.formats.packing import unit_shape, unpack


class FormatName(str):
    """A number format's name, as users type it and checkpoints record it.

    An open set: ``FormatName.declare("name")`` adds one (a format module declares its name and
    registers its factory, with no edit elsewhere). ``FormatName(text)`` returns the one declared
    instance, so names compare with ``is``, and refuses undeclared text in one line.
    """

    _declared: ClassVar[dict[str, FormatName]] = {}
    INT: ClassVar[FormatName]
    NF4: ClassVar[FormatName]
    FP4: ClassVar[FormatName]
    FP8_E4M3: ClassVar[FormatName]
    FP8_E5M2: ClassVar[FormatName]
    TERNARY: ClassVar[FormatName]
    LUT: ClassVar[FormatName]
    VQ: ClassVar[FormatName]

    def __new__(cls, value: str) -> FormatName:
        try:
            return cls._declared[str(value)]
        except KeyError:
            raise ValueError(f"unknown number format {value!r}; valid formats: {', '.join(cls._declared)}") from None

    @classmethod
    def declare(cls, value: str) -> FormatName:
        """The name ``value``, declared once (declaring it again returns the same instance)."""
        if value not in cls._declared:
            cls._declared[value] = str.__new__(cls, value)
        return cls._declared[value]

    @classmethod
    def all(cls) -> tuple[FormatName, ...]:
        return tuple(cls._declared.values())

    @property
    def value(self) -> str:
        return str.__str__(self)

    def __repr__(self) -> str:
        return f"FormatName({self.value!r})"

    def __reduce__(self) -> tuple:
        return FormatName, (self.value,)


for _attr, _name in (("INT", "int"), ("NF4", "nf4"), ("FP4", "fp4"), ("FP8_E4M3", "fp8_e4m3"), ("FP8_E5M2", "fp8_e5m2"),
                     ("TERNARY", "ternary"), ("LUT", "lut"), ("VQ", "vq")):
    setattr(FormatName, _attr, FormatName.declare(_name))


class NumberFormat(ABC):
    """A grid of ``2**bits`` values; codes are stored as ``torch.uint8`` before packing."""

    name: ClassVar[FormatName]
    bits: int
    signed: bool
    """True when the grid is symmetric around zero (everything but unsigned int)."""

    @property
    @abstractmethod
    def max_value(self) -> float:
        """Largest magnitude on the grid: a scale maps the clipping range onto it."""

    @property
    def absmax_level(self) -> float:
        """The grid value a symmetric scheme maps a row's largest magnitude to: ``max_value``."""
        return self.max_value

    @property
    def min_value(self) -> float:
        """Smallest grid value (``-max_value`` or lower for signed grids, 0 for unsigned)."""
        return float(self.decode(torch.arange(2**self.bits, dtype=torch.uint8)).nan_to_num(0.0).min())

    @abstractmethod
    def encode(self, x: Tensor) -> Tensor:
        """Nearest grid point of each value of ``x`` (float, any shape) as uint8 codes."""

    @abstractmethod
    def decode(self, codes: Tensor) -> Tensor:
        """Float32 values of uint8 ``codes`` (any shape)."""

    def decode_packed(self, packed: Tensor, n: int) -> Tensor:
        """Float32 values of ``n`` codes packed by ``pack``: ``[..., packed_length(n)]`` -> ``[..., n]``.

        Widths that hold whole codes per byte (1, 2, 4, 8 bits) decode with one table lookup per
        byte, which is what makes dequantize-then-matmul affordable in a forward pass.
        """
        codes_per_byte, unit_bytes = unit_shape(self.bits)
        if unit_bytes != 1:
            return self.decode(unpack(packed, self.bits, n))
        values = self._byte_table.to(packed.device)[packed.long()]  # [..., bytes, codes_per_byte]
        return values.reshape(*packed.shape[:-1], -1)[..., :n]

    @cached_property
    def _byte_table(self) -> Tensor:
        """``[256, codes_per_byte]``: the decoded codes that each byte value packs."""
        codes_per_byte, _ = unit_shape(self.bits)
        all_bytes = torch.arange(256, dtype=torch.int64, device="cpu") % (1 << (self.bits * codes_per_byte))
        return self.decode(unpack(all_bytes.to(torch.uint8)[:, None], self.bits, codes_per_byte))

    def round_trip(self, x: Tensor) -> Tensor:
        """``decode(encode(x))``: what the grid makes of ``x``."""
        return self.decode(self.encode(x))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(bits={self.bits})"


FormatFactory = Callable[[int, bool], NumberFormat]
FORMATS: dict[FormatName, FormatFactory] = {}
"""FormatName -> factory(bits, symmetric). Each format module adds itself with ``register_format``."""


def register_format(name: FormatName) -> Callable[[FormatFactory], FormatFactory]:
    """Decorator that files a format factory under ``name``; a name can be taken only once."""

    def add(factory: FormatFactory) -> FormatFactory:
        if name in FORMATS:
            raise ValueError(f"number format {name.value!r} is already registered")
        FORMATS[name] = factory
        return factory

    return add


@lru_cache(maxsize=None)
def make_format(name: FormatName | str, bits: int, symmetric: bool = True) -> NumberFormat:
    """The format ``name`` at ``bits`` bits (one shared instance per combination: formats are immutable).

    Raises:
        ValueError: unknown name, or a bits/symmetry combination the format does not have
            (for example ``nf4`` at 3 bits, or asymmetric ``fp8_e4m3``).
    """
    key = FormatName(name)
    if key not in FORMATS:
        raise ValueError(f"number format {name!r} is declared but no module registered it; import its module")
    return FORMATS[key](bits, symmetric)

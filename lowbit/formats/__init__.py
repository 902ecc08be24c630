"""Number formats and bit packing. Importing this package registers every format."""

from lowbit.formats import codebook, integer, iq4nl, minifloat, nf4, ternary  # noqa: F401  (registration side effect)
from lowbit.formats.base import FORMATS, FormatName, NumberFormat, make_format
from lowbit.formats.double_quant import DoubleQuantScales
from lowbit.formats.packing import pack, packed_length, unpack

__all__ = [
    "FORMATS", "FormatName", "NumberFormat", "make_format", "DoubleQuantScales", "pack", "packed_length", "unpack",
]

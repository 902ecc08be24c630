"""A toy number format, added in this one file: 3-bit codes on a cubic grid, denser near zero.

Everything lowbit needs from a format is here: a declared name, a ``NumberFormat`` (the grid) and
its registration. Schemes, packing, ``QuantizedWeight``, checkpoints and evaluation need no edit.
"""

from lowbit.formats.base import FormatName, register_format
from lowbit.formats.nf4 import LookupFormat

CUBIC3 = FormatName.declare("cubic3")
VALUES = tuple(((i - 3.5) / 3.5) ** 3 for i in range(8))  # -1 .. 1, eight levels


@register_format(CUBIC3)
def _cubic3(bits: int, symmetric: bool) -> LookupFormat:
    if bits != 3 or not symmetric:
        raise ValueError("cubic3 is a symmetric 3-bit grid; use --bits 3 --sym")
    return LookupFormat(CUBIC3, VALUES)

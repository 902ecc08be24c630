"""Quantization methods: float weight (+ optional calibration statistics) -> ``QuantizedWeight``.

``METHODS`` maps a method's name to its function; a new method is a new module that registers
itself with ``register_method`` and one import line here.
"""

from lowbit.methods.registry import METHODS, WeightMethod, get_method, register_method
from lowbit.methods import rtn  # noqa: F401,E402  (registration side effect)
from lowbit.methods import hqq  # noqa: F401,E402  (registration side effect)

__all__ = ["METHODS", "WeightMethod", "get_method", "register_method"]

"""Quantization methods and the transforms that prepare a model for them.

``METHODS`` (``lowbit.methods.registry``): float weights (+ the statistics a method declares) ->
``QuantizedWeight``. ``TRANSFORMS`` (``lowbit.methods.transforms``): exact rescalings and
rotations applied first. A new method or transform is a new module that registers itself and
one import line here.
"""

from lowbit.methods.registry import METHODS, Method, Statistic, get_method, register_method
from lowbit.methods.transforms import TRANSFORMS, Transform, TransformKind, get_transform, register_transform
from lowbit.methods import rtn  # noqa: F401,E402  (registration side effect)
from lowbit.methods import hqq  # noqa: F401,E402  (registration side effect)
from lowbit.methods import gptq  # noqa: F401,E402  (registration side effect)
from lowbit.methods import awq  # noqa: F401,E402  (registration side effect)
from lowbit.methods import squeezellm  # noqa: F401,E402  (registration side effect)
from lowbit.methods import smoothquant  # noqa: F401,E402  (registration side effect)
from lowbit.methods import rotation  # noqa: F401,E402  (registration side effect)
from lowbit.methods import vq  # noqa: F401,E402  (registration side effect)

__all__ = ["METHODS", "Method", "Statistic", "TRANSFORMS", "Transform", "TransformKind", "get_method",
           "get_transform", "register_method", "register_transform"]

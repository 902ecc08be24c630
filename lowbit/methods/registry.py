"""The method registry: a plain dict from name to the function that quantizes one weight."""

from __future__ import annotations

from typing import Callable, Protocol

from torch import Tensor

from lowbit.qweight import QuantizedWeight
from lowbit.scheme import QuantScheme


class WeightMethod(Protocol):
    def __call__(self, weight: Tensor, scheme: QuantScheme, *, layer: str = "weight") -> QuantizedWeight: ...


METHODS: dict[str, WeightMethod] = {}


def register_method(name: str) -> Callable[[WeightMethod], WeightMethod]:
    def add(fn: WeightMethod) -> WeightMethod:
        if name in METHODS:
            raise ValueError(f"method {name!r} is already registered")
        METHODS[name] = fn
        return fn

    return add


def get_method(name: str) -> WeightMethod:
    try:
        return METHODS[name]
    except KeyError:
        known = ", ".join(sorted([*METHODS, "gptq"]))  # gptq needs calibration: lowbit.api routes it
        raise ValueError(f"unknown method {name!r}; available methods: {known}") from None

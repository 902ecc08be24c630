"""The method table: one entry per quantization method, with its config and the statistics it reads.

A method turns the float weights of linears that read one input (q/k/v, gate/up, or a single
linear) into ``QuantizedWeight`` values, given the statistics of that input it declared. The
pipeline collects exactly the declared statistics and calls ``Method.solve``; nothing outside this
table and the method's own module knows a method by name. A new method is a new module that
calls ``register_method`` and one import line in ``lowbit/methods/__init__.py``.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from torch import Tensor

from lowbit.qweight import QuantizedWeight
from lowbit.scheme import QuantScheme


class Statistic(enum.Enum):
    """A statistic of a linear's input over the calibration tokens that a method or transform reads.

    ``INPUT_MAGNITUDES``: per input column, mean and max of ``|x|`` (``"absmean"``, ``"absmax"``).
    ``HESSIAN``: ``H = 2 X^T X / n`` (``"hessian"``); collecting it also yields the magnitudes.
    ``FISHER``: per weight, the mean squared gradient of the float model's calibration loss
    (``"fisher"``: ``[sum of the weights' out_features, in_features]``, the rows of the weights
    ``solve`` gets, stacked in their order; ``lowbit.pipeline.fisher``). A method config field
    ``fisher_samples`` (0: all) bounds the calibration windows it is computed on.
    """

    INPUT_MAGNITUDES = "input_magnitudes"
    HESSIAN = "hessian"
    FISHER = "fisher"


# What a method receives for the input its linears share: keys "hessian", "absmean", "absmax",
# "fisher" (those its declared statistics provide).
InputStatistics = Mapping[str, Tensor]


class Solve(Protocol):
    def __call__(self, weights: Sequence[Tensor], scheme: QuantScheme, config: Any, statistics: InputStatistics,
                 layers: Sequence[str]) -> list[QuantizedWeight]: ...


@dataclass(frozen=True)
class Method:
    """One row of the method table.

    Fields:
        name: what recipes and ``--method`` call it.
        config: its frozen dataclass of knobs; every field has a default and ``__post_init__``
            refuses bad values with one line.
        statistics: what it reads of its input (empty: data-free, no calibration needed).
        solve: ``(weights, scheme, config, statistics, layers) -> one QuantizedWeight per weight``
            for linears that read the same input and share ``scheme``; ``layers`` names them
            for messages. Deterministic.
        summary: one line for ``--help``.
    """

    name: str
    config: type
    statistics: frozenset[Statistic]
    solve: Solve
    summary: str

    @property
    def calibrated(self) -> bool:
        return bool(self.statistics)

    def default_config(self) -> Any:
        return self.config()

    def quantize(self, weight: Tensor, scheme: QuantScheme, *, config: Any = None,
                 statistics: InputStatistics | None = None, layer: str = "weight") -> QuantizedWeight:
        """One weight ``[out, in]``: ``solve`` for a single linear (``config`` None: the defaults)."""
        config = config_or_default(self, config)
        return self.solve([weight], scheme, config, statistics or {}, [layer])[0]


METHODS: dict[str, Method] = {}


def register_method(name: str, *, config: type, statistics: Sequence[Statistic] = (), summary: str
                    ) -> Callable[[Solve], Solve]:
    """Decorator adding ``solve`` to ``METHODS`` under ``name``."""

    def add(solve: Solve) -> Solve:
        check_new_entry(METHODS, "method", name, config)
        METHODS[name] = Method(name, config, frozenset(statistics), solve, summary)
        return solve

    return add


def check_new_entry(table: Mapping[str, Any], kind: str, name: str, config: type) -> None:
    """Refuse a name already in ``table`` and a config that is not a frozen dataclass (methods and
    transforms alike: their configs are stored in recipes as plain data)."""
    if name in table:
        raise ValueError(f"{kind} {name!r} is already registered")
    if not (dataclasses.is_dataclass(config) and config.__dataclass_params__.frozen):
        raise TypeError(f"the config of {kind} {name!r} must be a frozen dataclass, got {config!r}")


def per_weight(quantize_one: Callable[..., QuantizedWeight]) -> Solve:
    """A ``Solve`` from ``quantize_one(weight, scheme, config, statistics, layer)``, for methods whose
    linears gain nothing from being solved together."""

    def solve(weights: Sequence[Tensor], scheme: QuantScheme, config: Any, statistics: InputStatistics,
              layers: Sequence[str]) -> list[QuantizedWeight]:
        return [quantize_one(w, scheme, config, statistics, layer) for w, layer in zip(weights, layers)]

    solve.__doc__ = quantize_one.__doc__
    return solve


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; available methods: {', '.join(sorted(METHODS))}") from None


def config_or_default(owner: Any, config: Any) -> Any:
    """``owner``'s default config when ``config`` is None, else ``config`` checked by ``check_config``."""
    return owner.default_config() if config is None else check_config(owner, config)


def check_config(owner: Any, config: Any) -> Any:
    """``config`` when it is an instance of ``owner.config`` (a method or transform entry), else one line."""
    if not isinstance(config, owner.config):
        raise ValueError(f"{owner.name!r} takes a {owner.config.__name__}, got {type(config).__name__}")
    return config


def config_from_dict(owner: Any, values: Mapping[str, Any] | None) -> Any:
    """``owner.config(**values)``, refusing unknown keys with one line naming the valid ones."""
    values = dict(values or {})
    fields = {f.name for f in dataclasses.fields(owner.config)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"unknown {owner.name} config keys {unknown}; valid: {', '.join(sorted(fields)) or 'none'}")
    return owner.config(**values)


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)

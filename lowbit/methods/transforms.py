"""The transform table: exact changes of basis applied before a method quantizes the weights.

Two kinds, each a protocol of its own:

- ``CHANNEL_SCALING``: per block, from the statistics of an input that a group of linears shares,
  a per-input-channel scale ``s``; the pipeline multiplies the linears' input columns by ``s`` and
  folds ``1/s`` into the op that produces the input (``lowbit.nn.fold``), so the float block is
  unchanged. AWQ's searched scales and SmoothQuant's outlier migration are such transforms.
- ``ROTATION``: once, on the float model before anything is quantized; no float output changes.

A recipe lists transforms by name with their configs; any method composes with any transform,
except where an entry's ``excludes`` names the other's kind (a rotation's basis is not the one
channel scales are measured in). A new transform is a module that calls ``register_transform``
and one import line in ``lowbit/methods/__init__.py``.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from torch import Tensor, nn

from lowbit.methods.registry import InputStatistics, Statistic, check_new_entry
from lowbit.scheme import QuantScheme


class TransformKind(enum.Enum):
    CHANNEL_SCALING = "channel_scaling"
    ROTATION = "rotation"


@dataclass(frozen=True)
class ChannelScales:
    """What a channel-scaling search returns for one shared input: ``scale [in]`` to fold (None:
    leave the input as it is) and what it chose, for the report (plain values)."""

    scale: Tensor | None
    details: dict[str, Any] = field(default_factory=dict)


class ScaleSearch(Protocol):
    def __call__(self, weights: Sequence[Tensor], scheme: QuantScheme, config: Any,
                 statistics: InputStatistics) -> ChannelScales: ...


class Rotate(Protocol):
    def __call__(self, model: nn.Module, config: Any) -> None: ...


@dataclass(frozen=True)
class Transform:
    """One row of the transform table.

    Fields:
        name: what recipes call it.
        config: its frozen dataclass of knobs (defaults for every field, validated).
        statistics: what it reads of a block's inputs (empty for a rotation).
        kind: which protocol ``apply`` follows: ``ScaleSearch`` (``CHANNEL_SCALING``: the weights
            of the linears reading one input, unscaled, their scheme, the config and that input's
            statistics) or ``Rotate`` (``ROTATION``: the float model and the config, in place).
        apply: the function.
        excludes: kinds of transform this one does not compose with, and why (one line).
        summary: one line for ``--help``.
    """

    name: str
    config: type
    statistics: frozenset[Statistic]
    kind: TransformKind
    apply: ScaleSearch | Rotate
    summary: str
    excludes: Mapping[TransformKind, str] = field(default_factory=dict)

    def default_config(self) -> Any:
        return self.config()


TRANSFORMS: dict[str, Transform] = {}


def register_transform(name: str, *, config: type, kind: TransformKind, summary: str,
                       statistics: Sequence[Statistic] = (), excludes: Mapping[TransformKind, str] | None = None
                       ) -> Callable[[Callable], Callable]:
    """Decorator adding ``apply`` to ``TRANSFORMS`` under ``name``."""

    def add(apply: Callable) -> Callable:
        check_new_entry(TRANSFORMS, "transform", name, config)
        TRANSFORMS[name] = Transform(name, config, frozenset(statistics), kind, apply, summary, dict(excludes or {}))
        return apply

    return add


def get_transform(name: str) -> Transform:
    try:
        return TRANSFORMS[name]
    except KeyError:
        raise ValueError(f"unknown transform {name!r}; available transforms: {', '.join(sorted(TRANSFORMS))}") from None


def check_composition(names: Sequence[str], method: str) -> None:
    """Refuse, in one line, a transform listed twice or two that do not compose."""
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ValueError(f"transform {name!r} is listed twice; list each transform once")
    entries = [get_transform(n) for n in names]
    for a in entries:
        for b in entries:
            if b.kind in a.excludes:
                others = "+".join(e.name for e in entries if e.kind is b.kind)
                raise ValueError(f"{a.name} does not compose with {others!r}: {a.excludes[b.kind]}; "
                                 f"use method {method!r} with {a.name} alone, or drop it")

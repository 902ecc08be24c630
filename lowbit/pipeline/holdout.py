"""Choosing a method per tensor on held-out calibration windows.

A calibrated method (GPTQ) fits a weight to the Hessian of its calibration inputs; judged on that
same Hessian it always looks best, also where it only fits the calibration text (on SmolLM2 GPTQ
int4 g64 cut RTN's KL by 50% on WikiText-2 but by 33% on Python source). Here every ``every``-th
calibration window (the last of each run of ``every``: windows ``every-1, 2*every-1, ...``) is held
out: the candidates are fitted on the other windows only, and each linear keeps the candidate whose
output error ``tr(dW H_held dW^T)`` on the held-out windows' Hessian is smallest. What is kept is
exactly what was judged (no refit on all windows), so a recipe that pins the chosen methods
(``pinned_recipe``) and holds the same ``HoldOut`` makes the same weights again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor

from lowbit.methods import get_method
from lowbit.methods.registry import config_from_dict, config_or_default, config_to_dict
from lowbit.qweight import QuantizedWeight


@dataclass(frozen=True)
class MethodChoice:
    """A method of the table and its config (None: the method's defaults)."""

    method: str
    config: Any = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "config", config_or_default(get_method(self.method), self.config))

    @property
    def label(self) -> str:
        """``gptq``, or ``gptq(damp=0.1)`` for a config that differs from the defaults."""
        default = get_method(self.method).default_config()
        changed = [f"{f.name}={getattr(self.config, f.name)!r}" for f in fields(self.config)
                   if getattr(self.config, f.name) != getattr(default, f.name)]
        return f"{self.method}({', '.join(changed)})" if changed else self.method

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "config": config_to_dict(self.config)}

    @classmethod
    def from_dict(cls, d: Any) -> MethodChoice:
        """``rtn`` or ``{method: gptq, config: {damp: 0.1}}``."""
        if isinstance(d, str):
            return cls(d)
        if not isinstance(d, dict) or "method" not in d or set(d) - {"method", "config"}:
            raise ValueError(f"a held-out candidate is a method name or {{method: NAME, config: {{...}}}}, got {d!r}")
        return cls(d["method"], config_from_dict(get_method(d["method"]), d.get("config")))

    @classmethod
    def parse(cls, spec: str) -> MethodChoice:
        """The CLI's spelling: ``rtn`` or ``gptq:damp=0.1:act_order=false`` (values read as YAML scalars)."""
        import yaml

        name, *pairs = spec.strip().split(":")
        values = {}
        for pair in pairs:
            key, eq, value = pair.partition("=")
            if not eq:
                raise ValueError(f"held-out candidate {spec!r}: write METHOD or METHOD:KEY=VALUE[:KEY=VALUE], "
                                 "e.g. gptq:damp=0.1")
            values[key] = yaml.safe_load(value)
        return cls(name, config_from_dict(get_method(name), values))


@dataclass(frozen=True)
class HoldOut:
    """Hold out every ``every``-th calibration window (>= 2) and choose, per linear, between the
    recipe's method and ``candidates`` on them (see the module docstring)."""

    every: int = 4
    candidates: tuple[MethodChoice, ...] = field(default_factory=lambda: (MethodChoice("rtn"),))

    def __post_init__(self) -> None:
        if not (isinstance(self.every, int) and not isinstance(self.every, bool) and self.every >= 2):
            raise ValueError(f"holdout every must be an int >= 2 (every 4th window held out: 4), got {self.every!r}")
        object.__setattr__(self, "candidates", tuple(
            c if isinstance(c, MethodChoice) else MethodChoice.from_dict(c) for c in self.candidates))

    def to_dict(self) -> dict[str, Any]:
        return {"every": self.every, "candidates": [c.to_dict() for c in self.candidates]}

    @classmethod
    def from_dict(cls, d: Any) -> HoldOut:
        if not isinstance(d, dict) or set(d) - {"every", "candidates"}:
            raise ValueError(f"recipe holdout is {{every: N, candidates: [rtn, {{method: gptq, config: ...}}]}}, "
                             f"got {d!r}")
        return cls(d.get("every", 4), tuple(MethodChoice.from_dict(c) for c in d.get("candidates", ["rtn"])))


def is_held_out(window: int, every: int) -> bool:
    """Whether calibration window ``window`` (0-based) is held out: the last of each run of ``every``."""
    return window % every == every - 1


@torch.no_grad()
def output_error(weight: Tensor, qw: QuantizedWeight, H: Tensor) -> float:
    """``tr(dW H dW^T)`` with ``dW = dequantize(qw) - weight``: the summed squared change of the
    layer's outputs over the tokens ``H = 2 X^T X / n`` was taken on (up to the factor 2 / n)."""
    dW = qw.dequantize().float() - weight.float()
    return float(((dW @ H.float()) * dW).sum())


@dataclass(frozen=True)
class Choice:
    """What ``choose_on_heldout`` kept for one weight: the index and label of the candidate, every
    candidate's held-out error by label, and the weight itself."""

    index: int
    errors: dict[str, float]
    qweight: QuantizedWeight

    def to_dict(self) -> dict[str, Any]:
        labels = list(self.errors)
        return {"chosen": labels[self.index], "heldout_errors": self.errors}


def choose_on_heldout(weights: Sequence[Tensor], H_held: Tensor, labels: Sequence[str],
                      solve: Callable[[int], list[QuantizedWeight]]) -> list[Choice]:
    """Per weight, the candidate with the smallest ``output_error`` on ``H_held``; ties go to the first.

    Args:
        weights: float ``[out, in]`` weights that read one input (q/k/v, or one linear).
        H_held: ``[in, in]`` Hessian of the held-out windows' inputs.
        labels: one distinct label per candidate, in order of preference on ties.
        solve: candidate index -> one ``QuantizedWeight`` per weight, fitted on the other windows.
    """
    if len(set(labels)) != len(labels):
        raise ValueError(f"held-out candidates must differ, got {list(labels)}")
    results = [solve(k) for k in range(len(labels))]
    choices = []
    for i, weight in enumerate(weights):
        errors = {label: output_error(weight, r[i], H_held) for label, r in zip(labels, results)}
        best = min(range(len(labels)), key=lambda k: (errors[labels[k]], k))
        choices.append(Choice(best, errors, results[best][i]))
    return choices

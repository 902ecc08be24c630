"""``ActScheme``: how the *inputs* of the quantized linears are quantized (W8A8), as plain data.

Weight-only schemes shrink memory; quantizing activations too lets the product run on 8-bit
operands: int8 x int8 with int32 accumulation, or FP8 E4M3 x FP8 E4M3 with float32 accumulation.
An activation scheme is recorded in the recipe and the checkpoint like a weight scheme.

- dynamic: the scale is computed on the fly from each token's (``granularity="token"``) or the whole
  input's (``"tensor"``) largest magnitude; no calibration.
- static: one scale per layer input, fixed ahead of time from calibration windows by ``observer``
  (``minmax``, ``percentile``, ``mse``, ``kl``; see ``lowbit.histogram``) and stored in the
  checkpoint as the layer's ``input_scale``. ``outlier_ratio`` lets the few layers whose range
  is set by rare huge tokens run dynamic per-token scales instead (``lowbit.pipeline.activations``).

Scales are symmetric (no zero-point), the largest magnitude mapping to 127 (int8) or 448 (E4M3): a
zero-point would add a rank-one correction term to every integer product.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
from torch import Tensor

from lowbit.formats import FormatName
from lowbit.scheme import OBSERVERS, Granularity, QuantScheme, _enum, checked_fields

ACT_SCHEME_VERSION = 1


class ActFormat(str, Enum):
    INT8 = "int8"
    FP8_E4M3 = "fp8_e4m3"


# The value a scale maps the clipping threshold to.
ACT_MAX_LEVEL = {ActFormat.INT8: 127.0, ActFormat.FP8_E4M3: 448.0}
# Smallest scale used for an all-zero token or input, so that it quantizes to zeros.
_MIN_SCALE = 1e-12
# Smallest threshold a static scale is made from (an input that was all zeros in calibration).
_MIN_THRESHOLD = 1e-30


@dataclass(frozen=True)
class ActScheme:
    """How a linear layer's input is quantized before its 8-bit matrix product."""

    format: ActFormat = ActFormat.INT8
    dynamic: bool = True
    granularity: str = "token"  # dynamic only: "token" (one scale per row of the input) or "tensor"
    observer: str = "minmax"  # static only
    percentile: float = 99.99  # static "percentile" only: the |x| quantile kept
    # static only: a layer whose threshold exceeds its median calibration token's max |x| by more
    # than this runs dynamic per-token scales instead; None keeps every layer static
    outlier_ratio: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "format", _enum(ActFormat, self.format, "activation format"))
        if self.granularity not in ("token", "tensor"):
            raise ValueError(f"unknown activation granularity {self.granularity!r}; valid: token, tensor")
        if not self.dynamic and self.granularity != "tensor":
            raise ValueError("static activation scales are per tensor (one per layer input); "
                             "use --act-granularity tensor or --dynamic for per-token scales")
        if self.observer not in OBSERVERS:
            raise ValueError(f"unknown activation observer {self.observer!r}; valid: {', '.join(OBSERVERS)}")
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"activation percentile must be in (50, 100], got {self.percentile!r}; e.g. 99.99")
        if self.outlier_ratio is not None and (self.dynamic or not self.outlier_ratio > 1.0):
            raise ValueError(f"--act-outlier-ratio applies to static scales and must be above 1, got "
                             f"{self.outlier_ratio!r}{' with dynamic scales' if self.dynamic else ''}; e.g. 8")
        if self.format is ActFormat.FP8_E4M3 and self.observer == "kl" and not self.dynamic:
            raise ValueError("the kl observer models a uniform int grid and does not apply to fp8_e4m3; "
                             "use minmax, percentile or mse")

    @property
    def max_level(self) -> float:
        return ACT_MAX_LEVEL[self.format]

    def scale_for(self, threshold: float) -> float:
        """The static scale that maps a clipping ``threshold`` to ``max_level``."""
        return max(threshold, _MIN_THRESHOLD) / self.max_level

    @property
    def code_range(self) -> tuple[float, float]:
        """The smallest and largest code ``encode`` produces: [-128, 127] (int8) or +-448 (E4M3)."""
        return (-128.0, 127.0) if self.format is ActFormat.INT8 else (-self.max_level, self.max_level)

    def encode(self, y: Tensor) -> Tensor:
        """Codes of already scaled float values ``y``: int8 (round half to even, clamped to
        [-128, 127]) or ``float8_e4m3fn`` (nearest, clamped to +-448). Modifies ``y``."""
        lo, hi = self.code_range
        if self.format is ActFormat.INT8:
            return y.round_().clamp_(lo, hi).to(torch.int8)
        return y.clamp_(lo, hi).to(torch.float8_e4m3fn)

    def fake_quant(self, v: Tensor, threshold: float) -> Tensor:
        """``v`` quantize-dequantized on this grid with the static scale of ``threshold`` (what the
        ``mse`` observer scores candidate thresholds by)."""
        s = self.scale_for(threshold)
        return self.encode(v / s).float().mul_(s)

    def per_token_fallback(self) -> ActScheme:
        """The dynamic per-token scheme of this format: what an outlier layer of a static scheme runs."""
        return ActScheme(format=self.format)

    def weight_scheme(self) -> QuantScheme:
        """The weight scheme whose codes this activation format multiplies: int8 symmetric or FP8
        E4M3, one scale per output channel."""
        if self.format is ActFormat.INT8:
            return QuantScheme(format=FormatName.INT, bits=8, granularity=Granularity.CHANNEL, symmetric=True)
        return QuantScheme(format=FormatName.FP8_E4M3, bits=8, granularity=Granularity.CHANNEL, symmetric=True)

    def check_weight_scheme(self, scheme: QuantScheme, layer: str = "layer") -> None:
        """Raise unless ``scheme`` gives 8-bit codes of this format with one scale per output row
        (per channel or per tensor), which is what the 8-bit product needs."""
        want = self.weight_scheme()
        ok = (scheme.format is want.format and scheme.bits == 8 and scheme.symmetric and not scheme.double_quant
              and scheme.granularity in (Granularity.CHANNEL, Granularity.TENSOR))
        if not ok:
            flags = "--bits 8 --sym --per-channel" if self.format is ActFormat.INT8 else "--format fp8_e4m3 --per-channel"
            raise ValueError(f"{layer}: {self.format.value} activations need {want.describe()} weights for the "
                             f"8-bit product, got {scheme.describe()}; use {flags}")

    def describe(self) -> str:
        """Short label, e.g. ``int8 dynamic per-token`` or ``int8 static (percentile 99.99)``."""
        if self.dynamic:
            return f"{self.format.value} dynamic per-{self.granularity}"
        how = f"percentile {self.percentile:g}" if self.observer == "percentile" else self.observer
        outliers = "" if self.outlier_ratio is None else f", dynamic above {self.outlier_ratio:g}x"
        return f"{self.format.value} static ({how}{outliers})"

    def to_dict(self) -> dict[str, Any]:
        d = {"version": ACT_SCHEME_VERSION, "format": self.format.value, "dynamic": self.dynamic,
             "granularity": self.granularity, "observer": self.observer, "percentile": self.percentile}
        if self.outlier_ratio is not None:  # absent, not null: records written before the field stay identical
            d["outlier_ratio"] = self.outlier_ratio
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ActScheme:
        return cls(**checked_fields(d, "activation scheme", ACT_SCHEME_VERSION, set(cls.__dataclass_fields__)))


def dynamic_scale(x: Tensor, act: ActScheme) -> Tensor:
    """The dynamic scale of float ``x [M, K]``: ``max|x| / max_level`` per row (``[M, 1]``, per-token)
    or over the whole input (``[1, 1]``), never below the scale that keeps an all-zero input at zeros."""
    amax = x.abs().amax(dim=1, keepdim=True) if act.granularity == "token" else x.abs().amax().reshape(1, 1)
    return (amax / act.max_level).clamp_(min=_MIN_SCALE)


def quantize_activation(x: Tensor, act: ActScheme, static_scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``x [M, K]`` float -> ``(codes [M, K], scale [M, 1] float32)`` with ``x ~= codes * scale``.

    Codes as ``ActScheme.encode`` makes them. ``static_scale`` (a 0-d tensor) is required exactly
    when the scheme is static; dynamic scales are ``max|x| / max_level`` per row or over the whole input.
    """
    x = x.float()
    if act.dynamic:
        scale = dynamic_scale(x, act)
    else:
        if static_scale is None:
            raise ValueError("a static activation scheme needs its calibrated input_scale")
        scale = static_scale.float().reshape(1, 1)
    return act.encode(x / scale), scale.expand(x.shape[0], 1)

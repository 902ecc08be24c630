"""What a model costs to store: exact bits per weight of its linear layers, and bytes in all."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from lowbit.nn import QuantLinear


@dataclass(frozen=True)
class SizeReport:
    """Sizes counted from the tensors a checkpoint stores (tied weights once).

    ``bpw`` is over the quantized linear layers: codes, scales, zero-points and double-quantization
    constants all count. A model with no quantized layer reports its float linears' dtype width.
    """

    quantized_layers: int
    quantized_weights: int
    quantized_bits: int
    bpw: float
    size_bytes: int
    float_linear_layers: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def size_report(model: nn.Module) -> SizeReport:
    qlayers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    flinears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    weights = sum(m.in_features * m.out_features for m in qlayers)
    bits = sum(m.quantized_weight().storage_bits() for m in qlayers)
    if qlayers:
        bpw = bits / weights
    else:
        bpw = float(flinears[0].weight.element_size() * 8) if flinears else 0.0
    return SizeReport(len(qlayers), weights, bits, bpw, stored_bytes(model), len(flinears))


def stored_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and persistent buffer, each tensor storage counted once."""
    seen: set[int] = set()
    total = 0
    for t in model.state_dict(keep_vars=True).values():
        key = t.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total

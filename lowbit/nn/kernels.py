"""The kernel table: which forward a quantized linear layer runs, by (scheme, device).

An entry says whether it applies to a scheme on a device (None, or the reason it does not), how it
lays a ``QuantizedWeight`` out for itself (``prepare``, done once by an explicit call, never inside
``.to()`` or ``forward``) and how it computes ``x W^T + b`` from that layout. The activation
precision of products of few rows (decode) is chosen with it (``ACTIVATIONS``): "float32" is exact;
"int16" rounds x to 16-bit fixed point per row (KL 2e-6 against exact on SmolLM2, far below the 0.001
a default may cost; bench/decode_activations.py), "int8" to int8 per block of 64 (KL 0.007: an
option); "auto", the default, is int16 where the kernel can and float32 elsewhere. A kernel that can
round has ``prepare_rounded``; ``Prepared.activations`` says what a layer got. Entries are tried in
table order; the reference, dequantize + ``F.linear``, applies to every scheme and device, comes
last, and is what every other entry is tested against.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lowbit import kernels as compiled
from lowbit.kernels import vq
from lowbit.qweight import QuantizedWeight
from lowbit.scheme import Granularity, QuantScheme


@dataclass(frozen=True)
class Kernel:
    """One way to run a quantized linear layer.

    ``supports(scheme, device)``: None when the kernel runs this scheme on this device, else why not.
    ``prepare(qweight)``: the kernel's layout of the weight (its own tensors on the weight's device).
    ``forward(x, prepared, bias)``: ``x W^T + b`` for float ``x [..., in]``, in ``x``'s dtype.
    ``prepare_rounded(qweight, activations)``: a layout whose ``forward`` rounds x to ``activations``
    ("int8", "int16") in products of few rows, or None where it cannot for this weight; None for a
    kernel that always computes with float activations.
    """

    name: str
    supports: Callable[[QuantScheme, torch.device], str | None]
    prepare: Callable[[QuantizedWeight], Any]
    forward: Callable[[Tensor, Any, Tensor | None], Tensor]
    prepare_rounded: Callable[[QuantizedWeight, str], Any | None] | None = None


@dataclass(frozen=True)
class Prepared:
    """A layer's weight as one kernel laid it out, for one device."""

    kernel: Kernel
    layout: Any
    device: torch.device
    activations: str = "float32"


def _reference_forward(x: Tensor, qweight: QuantizedWeight, bias: Tensor | None) -> Tensor:
    return F.linear(x, qweight.dequantize(x.dtype), None if bias is None else bias.to(x.dtype))


ACTIVATIONS = ("auto", "float32", "int8", "int16")
AUTO_ACTIVATIONS = "int16"  # what "auto" asks for where the kernel can round
REFERENCE = Kernel("reference", lambda scheme, device: None, lambda qweight: qweight, _reference_forward)
KERNELS: list[Kernel] = [REFERENCE]


def register_kernel(kernel: Kernel) -> Kernel:
    """Add ``kernel`` to the table, after the kernels registered before it and before the reference."""
    if any(k.name == kernel.name for k in KERNELS):
        raise ValueError(f"kernel {kernel.name!r} is already registered")
    KERNELS.insert(len(KERNELS) - 1, kernel)
    return kernel


def select_kernel(scheme: QuantScheme, device: torch.device | str) -> tuple[Kernel, dict[str, str]]:
    """The first kernel of the table that runs ``scheme`` on ``device``, and why each earlier one did not."""
    device = torch.device(device)
    passed: dict[str, str] = {}
    for kernel in KERNELS:
        reason = kernel.supports(scheme, device)
        if reason is None:
            return kernel, passed
        passed[kernel.name] = reason
    raise AssertionError("the reference kernel applies to every scheme")


def _compiled_cpu_supports(scheme: QuantScheme, device: torch.device) -> str | None:
    if device.type != "cpu":
        return "CPU only"
    if scheme.group_index:
        return "no column group index in the CPU kernels"
    return compiled.supports(scheme) or compiled.status()  # status builds the extension once, on first use


def _compiled_cpu_prepare_rounded(qweight: QuantizedWeight, activations: str) -> compiled.PreparedWeight | None:
    if compiled.int8_activations_reason(qweight.scheme) is not None:
        return None
    layout = compiled.prepare(qweight, activations)
    return layout if layout.activations == activations else None  # a width without whole blocks of 64


register_kernel(Kernel("lowbit-cpu", _compiled_cpu_supports, compiled.prepare, compiled.linear,
                       _compiled_cpu_prepare_rounded))


def _vq_supports(scheme: QuantScheme, device: torch.device) -> str | None:
    return "CPU only" if device.type != "cpu" else vq.supports_vq(scheme)


register_kernel(Kernel("lowbit-cpu-vq", _vq_supports, vq.prepare_vq, vq.linear_vq))


def _int8_channel_supports(scheme: QuantScheme, device: torch.device) -> str | None:
    if device.type != "cpu":
        return "CPU only"
    if (scheme.format.value, scheme.bits, scheme.granularity, scheme.symmetric) != ("int", 8, Granularity.CHANNEL, True):
        return "int8 per-channel symmetric weights only"
    if scheme.double_quant or scheme.sparse or scheme.group_index:
        return "plain float16 scales only"
    return None


def _int8_channel_prepare(qweight: QuantizedWeight) -> tuple[Tensor, Tensor]:
    # offset-binary codes q + 128 -> two's complement q; w = s * q exactly (lowbit's int8 grid)
    return (qweight.qdata ^ 0x80).view(torch.int8).contiguous(), qweight.scale.float().reshape(-1).contiguous()


def _int8_channel_forward(x: Tensor, layout: tuple[Tensor, Tensor], bias: Tensor | None) -> Tensor:
    codes, scale = layout
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    dtype = x.dtype if x.dtype in (torch.float32, torch.bfloat16) else torch.float32
    y = torch._weight_int8pack_mm(x2.to(dtype), codes, scale.to(dtype))
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*lead, -1).to(x.dtype)


register_kernel(Kernel("torch-int8pack", _int8_channel_supports, _int8_channel_prepare, _int8_channel_forward))

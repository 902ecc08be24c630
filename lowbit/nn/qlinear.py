"""``QuantLinear``: a linear layer whose weight lives as a ``QuantizedWeight``.

The module keeps only the stored tensors (as buffers named by ``lowbit.qweight.FIELDS``, so
``state_dict`` and checkpoints see exactly what is stored). Its forward runs the kernel that
``prepare_kernel`` chose from ``lowbit.nn.kernels`` for its scheme and device; until that explicit
step, or where no kernel applies, it runs the reference: the float weight is rebuilt for each
forward and dropped after it, which keeps the resident model at its quantized size.
``compute_dtype`` (bitsandbytes' ``bnb_4bit_compute_dtype``) picks the dtype the product runs in;
by default the input's.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lowbit.nn.kernels import AUTO_ACTIVATIONS, REFERENCE, Prepared, select_kernel
from lowbit.qweight import QuantizedWeight, WeightLayout, expected_tensors
from lowbit.scheme import QuantScheme


class QuantLinear(nn.Module):
    """``y = x W'^T + b`` with ``W'`` the dequantized weight, computed in ``x``'s dtype."""

    def __init__(self, in_features: int, out_features: int, scheme: QuantScheme, bias: bool = False,
                 bias_dtype: torch.dtype = torch.float32, outliers: int = 0) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.layout = WeightLayout(scheme, (out_features, in_features), outliers)
        stored = expected_tensors(self.layout)
        self.stored_names = tuple(stored)  # the buffers that make up the weight, fixed by the layout
        for name, (shape, dtype) in stored.items():
            self.register_buffer(name, torch.zeros(shape, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=bias_dtype), requires_grad=False) if bias else None
        self.compute_dtype: torch.dtype | None = None
        self.prepared: Prepared | None = None

    @property
    def scheme(self) -> QuantScheme:
        return self.layout.scheme

    @classmethod
    def from_quantized(cls, qweight: QuantizedWeight, bias: Tensor | None = None) -> QuantLinear:
        out_features, in_features = qweight.shape
        module = cls(in_features, out_features, qweight.scheme, bias is not None,
                     bias.dtype if bias is not None else torch.float32, qweight.layout.outliers)
        for name, tensor in qweight.tensors().items():
            setattr(module, name, tensor)
        if bias is not None:  # a new parameter where the bias is (a GPU, when the pipeline quantizes there)
            module.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return module

    @property
    def qweight(self) -> Tensor:
        """The packed codes under the name GPTQ-style layers give them: peft finds a quantized base
        layer's device through ``qweight`` (``LoraModel._replace_module``)."""
        return self.qdata

    def quantized_weight(self) -> QuantizedWeight:
        """The stored weight as a ``QuantizedWeight``: a view on the buffers, no copy, no checks
        (``validate`` checks them once, after loading)."""
        return QuantizedWeight(self.layout, {name: getattr(self, name) for name in self.stored_names})

    def validate(self) -> None:
        """Check every buffer's shape and dtype against the scheme.

        Raises:
            ValueError: a buffer does not match (a truncated or foreign checkpoint).
        """
        QuantizedWeight.from_tensors(self.scheme, self.layout.shape, self.quantized_weight().tensors(),
                                     self.layout.outliers)

    def prepare_kernel(self, activations: str = "auto") -> str:
        """Choose this layer's kernel for the device its buffers are on and lay the weight out for it,
        computing with ``activations`` where the kernel can (see ``lowbit.nn.kernels.ACTIVATIONS``).

        Explicit and repeatable: call it again after moving the layer or changing its buffers (loading
        a state dict drops the prepared layout). Returns ``kernel_name``.
        """
        device = self.qdata.device
        kernel, _ = select_kernel(self.scheme, device)
        if kernel is REFERENCE:
            self.prepared = None
            return self.kernel_name
        qweight = self.quantized_weight()
        wanted = AUTO_ACTIVATIONS if activations == "auto" else activations
        rounded = None
        if wanted != "float32" and kernel.prepare_rounded is not None:
            rounded = kernel.prepare_rounded(qweight, wanted)
        if rounded is not None:
            self.prepared = Prepared(kernel, rounded, device, wanted)
        else:
            self.prepared = Prepared(kernel, kernel.prepare(qweight), device)
        return self.kernel_name

    @property
    def kernel_name(self) -> str:
        """The kernel's name, with the activation precision when it is not float32 (``lowbit-cpu/int8``)."""
        if self.prepared is None:
            return REFERENCE.name
        used = self.prepared.activations
        return self.prepared.kernel.name + ("" if used == "float32" else f"/{used}")

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self.prepared = None  # a layout made from the old buffers would compute the old weight
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        dtype = self.compute_dtype or x.dtype
        prepared = self.prepared
        if prepared is None:
            return REFERENCE.forward(x.to(dtype), self.quantized_weight(), self.bias).to(x.dtype)
        if x.device != prepared.device:
            raise ValueError(f"this layer's kernel {prepared.kernel.name!r} was prepared for {prepared.device}, "
                             f"the input is on {x.device}; call lowbit.nn.prepare_kernels(model) after moving it")
        return prepared.kernel.forward(x.to(dtype), prepared.layout, self.bias).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme.describe()}, "
                f"kernel={self.kernel_name}")

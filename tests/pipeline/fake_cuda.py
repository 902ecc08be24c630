"""A stand-in CUDA device on a CPU-only machine, to catch device mistakes where no GPU is.

Inside ``fake_cuda()``, ``torch.cuda.is_available()`` is True and a tensor "on cuda:0" is a
``FakeCudaTensor``: a wrapper whose ``device`` says cuda:0 and whose values live in a CPU tensor, so
every op computes exactly what the CPU computes. What a real GPU refuses is refused here too, as
torch's CUDA kernels word it: an op mixing a cuda tensor with a CPU tensor of one or more dimensions
(0-dimensional CPU tensors, index tensors and copies are allowed there, and here), and
``.numpy()`` of a cuda tensor. Tensors reach the device only the ways real code moves them: ``.to``
/ ``.cuda()`` (a copy, as across devices), factories given ``device=`` a cuda device, and ops on
cuda tensors. ``Module.to`` goes through ``.to`` (and swaps in new parameters, as it does for a
tensor subclass).

How: a ``TorchFunctionMode`` sees every torch call; one that touches a stand-in tensor is checked,
then computed on the CPU values and its results wrapped (at the Python level, so that composite ops
never build intermediates on a device this torch lacks). Calls the mode lets through with the
wrappers themselves (attribute access such as ``.data``) reach ``__torch_dispatch__``, which does the same.

Not modelled: asynchronous execution, memory limits, ``torch.Generator(device="cuda")``, and CUDA's
own kernels (summation order, TF32, atomics): results are the CPU's bit for bit, which is what lets a
test compare the plumbing byte for byte.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

CUDA0 = torch.device("cuda", 0)
# Ops whose CUDA kernels take CPU operands (copies between devices, CPU index tensors), by aten name
# (__torch_dispatch__) and by Python function (the mode).
_MIXED_OK = {"aten::copy_", "aten::_to_copy", "aten::index.Tensor", "aten::index_put_", "aten::_index_put_impl_",
             "aten::index_put"}


class FakeCudaTensor(torch.Tensor):
    """A tensor that says it is on cuda:0; ``elem`` holds its values on the CPU."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor) -> FakeCudaTensor:
        return torch.Tensor._make_wrapper_subclass(cls, elem.shape, strides=elem.stride(), dtype=elem.dtype,
                                                   device=CUDA0, requires_grad=elem.requires_grad,
                                                   storage_offset=elem.storage_offset())

    def __init__(self, elem: torch.Tensor) -> None:
        self.elem = elem

    def __repr__(self) -> str:
        return f"FakeCudaTensor({self.elem!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        _check_devices(func, args, kwargs)
        out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
        if func._schema.name.endswith("_") or func is torch.ops.aten.copy_.default:
            return args[0]  # in place: the wrapper of the mutated tensor
        return tree_map(_wrap, out)


def _unwrap(t: Any) -> Any:
    return t.elem if isinstance(t, FakeCudaTensor) else t


def _wrap(t: Any) -> Any:
    return FakeCudaTensor(t) if isinstance(t, torch.Tensor) and not isinstance(t, FakeCudaTensor) else t


def _check_devices(func, args, kwargs) -> None:
    tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    cpu = [t for t in tensors if not isinstance(t, FakeCudaTensor) and t.dim() > 0]
    if cpu and len(cpu) < len(tensors) and func._schema.name not in _MIXED_OK:
        raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, "
                           f"cuda:0 and cpu! ({func._schema.name})")


def _is_cuda(device: Any) -> bool:
    return device is not None and torch.device(device).type == "cuda"


def _target_device(args: tuple, kwargs: dict) -> torch.device | None:
    """The device a ``Tensor.to`` call asks for, or None (a dtype change only)."""
    if "device" in kwargs:
        return torch.device(kwargs["device"])
    for a in args:
        if isinstance(a, (str, torch.device)):
            return torch.device(a)
        if isinstance(a, torch.Tensor):
            return a.device
    return None


def _without_device(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """``Tensor.to``'s arguments less the device: its dtype (a tensor's, when given one), memory format and copy."""
    dtype = kwargs.get("dtype") or next((a.dtype if isinstance(a, torch.Tensor) else a for a in args
                                         if isinstance(a, (torch.dtype, torch.Tensor))), None)
    kept = {"dtype": dtype} if dtype is not None else {}
    for name in ("memory_format", "copy"):
        if kwargs.get(name) is not None:
            kept[name] = kwargs[name]
    return (), kept


_MIXED_OK_FUNCTIONS = {torch.Tensor.__getitem__, torch.Tensor.__setitem__, torch.Tensor.copy_,
                       torch.Tensor.index_put_, torch.Tensor.index_put}


class _FakeCudaMode(TorchFunctionMode):
    """Every torch call that touches a stand-in tensor: checked as CUDA would check it, then computed on
    the CPU values (composite ops would otherwise build intermediate tensors on a device torch lacks)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.cpu):
            return self._move(func, args, kwargs)
        if func is torch._has_compatible_shallow_copy_type:  # no: Module.to then swaps in a new Parameter
            return not any(isinstance(a, FakeCudaTensor) for a in args) and func(*args)
        name = getattr(func, "__name__", "")
        if name in ("__get__", "__set__", "__delete__"):  # attributes: the wrapper's own
            owner = getattr(func, "__self__", None)
            if name == "__get__" and args and isinstance(args[0], FakeCudaTensor):
                attribute = getattr(owner, "__name__", "")
                if attribute == "device":
                    return CUDA0
                if attribute in ("is_cuda", "is_cpu"):
                    return attribute == "is_cuda"
            return func(*args, **kwargs)
        if func is torch.Tensor.numpy and isinstance(args[0], FakeCudaTensor):
            raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor "
                            "to host memory first.")
        if _is_cuda(kwargs.get("device")):  # a factory: torch.zeros(..., device="cuda")
            return tree_map(_wrap, func(*args, **{**kwargs, "device": "cpu"}))
        leaves = torch.utils._pytree.tree_leaves((args, kwargs))
        fakes = {id(t.elem): t for t in leaves if isinstance(t, FakeCudaTensor)}
        if not fakes:
            return func(*args, **kwargs)
        cpu = [t for t in leaves if isinstance(t, torch.Tensor) and not isinstance(t, FakeCudaTensor) and t.dim() > 0]
        if cpu and func not in _MIXED_OK_FUNCTIONS:
            raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, "
                               f"cuda:0 and cpu! ({getattr(func, '__qualname__', func)})")
        out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
        return tree_map(lambda t: fakes[id(t)] if id(t) in fakes else _wrap(t), out)

    @staticmethod
    def _move(func, args, kwargs):
        self, rest = args[0], args[1:]
        if func is torch.Tensor.cuda:
            target = CUDA0
        elif func is torch.Tensor.cpu:
            target = torch.device("cpu")
        else:
            target = _target_device(rest, kwargs)
        on_fake = isinstance(self, FakeCudaTensor)
        if not on_fake and (target is None or target.type != "cuda"):
            return func(*args, **kwargs)  # not the stand-in's business (the CPU, the meta device)
        if on_fake and target is not None and target.type not in ("cuda", "cpu"):
            raise RuntimeError(f"the stand-in cuda device moves to the CPU only, not to {target}")
        rest, kwargs = _without_device(rest, kwargs) if func is torch.Tensor.to else ((), {})
        values = self.elem if on_fake else self
        if target is None or (target.type == "cuda") == on_fake:  # no device change
            moved = torch.Tensor.to(values, *rest, **kwargs)
            return self if moved is values else (_wrap(moved) if on_fake else moved)
        copy = torch.Tensor.to(values, *rest, **kwargs).clone()  # across devices: always a copy
        return FakeCudaTensor(copy) if target.type == "cuda" else copy


@contextlib.contextmanager
def fake_cuda(monkeypatch) -> Iterator[None]:
    """Within: one stand-in CUDA device (``torch.cuda.is_available()`` is True)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    with _FakeCudaMode():
        yield

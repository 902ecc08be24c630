"""``QuantizedWeight``: the one value every path in lowbit passes along (see DESIGN.md).

Methods produce it, modules run it, exporters write it, evaluators measure it. It holds packed
codes plus what gives them meaning; nothing else is needed to rebuild the float weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lowbit.formats import DoubleQuantScales, pack, packed_length, unpack
from lowbit.formats.double_quant import DQ_BLOCK
from lowbit.quantizer import dequantize_values, rows_shape
from lowbit.scheme import QuantScheme, ZeroPoint


@dataclass
class QuantizedWeight:
    """A weight ``[out_features, in_features]`` in packed codes plus scales.

    Let ``R, G = rows_shape(shape, scheme)``: ``R`` is ``out_features`` (or 1 per tensor) and ``G``
    the number of groups per row (1 per channel or per tensor).

    Fields:
        scheme: the ``QuantScheme`` the codes follow.
        shape: ``(out_features, in_features)``.
        qdata: uint8 ``[out_features, packed_length(in_features, bits)]``, codes packed along ``in``.
        scale: float16 ``[R, G]``; None when ``scheme.double_quant`` (then ``scale_dq`` holds them).
        scale_dq: ``DoubleQuantScales`` for ``[R, G]`` scales, or None.
        zero: None when symmetric; for ``ZeroPoint.INT`` uint8 ``[R, packed_length(G, bits)]``
            (integer zero-points packed like the codes); for ``ZeroPoint.FLOAT`` float16 ``[R, G]``
            minimums.
    """

    scheme: QuantScheme
    shape: tuple[int, int]
    qdata: Tensor
    scale: Tensor | None
    scale_dq: DoubleQuantScales | None = None
    zero: Tensor | None = None

    @classmethod
    def from_codes(cls, codes: Tensor, scale: Tensor, zero: Tensor | None, scheme: QuantScheme) -> QuantizedWeight:
        """Pack unpacked uint8 ``codes [out, in]`` with float ``scale``/``zero`` ``[R, G]``."""
        out_features, in_features = codes.shape
        R, G = rows_shape((out_features, in_features), scheme)
        scale = scale.reshape(R, G)
        packed_zero = None
        if zero is not None:
            zero = zero.reshape(R, G)
            if scheme.zero_point is ZeroPoint.INT:
                packed_zero = pack(zero.to(torch.uint8), scheme.bits)
            else:
                packed_zero = zero.half()
        if scheme.double_quant:
            return cls(scheme, (out_features, in_features), pack(codes, scheme.bits), None,
                       DoubleQuantScales.from_scales(scale), packed_zero)
        return cls(scheme, (out_features, in_features), pack(codes, scheme.bits), scale.half(), None, packed_zero)

    def codes(self) -> Tensor:
        """Unpacked uint8 codes ``[out_features, in_features]``."""
        return unpack(self.qdata, self.scheme.bits, self.shape[1])

    def scales(self) -> Tensor:
        """Float32 scales ``[R, G]`` (decoded from their 8-bit form when double-quantized)."""
        if self.scale_dq is not None:
            return self.scale_dq.dequantize()
        assert self.scale is not None, "a QuantizedWeight has either scale or scale_dq"
        return self.scale.float()

    def zeros(self) -> Tensor | None:
        """Float32 zero-points (INT) or minimums (FLOAT) ``[R, G]``, or None when symmetric."""
        if self.zero is None:
            return None
        if self.scheme.zero_point is ZeroPoint.INT:
            R, G = rows_shape(self.shape, self.scheme)
            return unpack(self.zero, self.scheme.bits, G).float()
        return self.zero.float()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The float weight ``[out_features, in_features]`` these codes stand for."""
        R, G = rows_shape(self.shape, self.scheme)
        zero = self.zeros()
        fmt = self.scheme.number_format()
        values = fmt.decode_packed(self.qdata, self.shape[1]).reshape(R * G, -1)
        rows = dequantize_values(values, self.scales().reshape(-1), None if zero is None else zero.reshape(-1),
                                 self.scheme)
        return rows.reshape(self.shape).to(dtype)

    def storage_bits(self) -> int:
        """Every bit stored: codes, scales (or their double quantization) and zero-points."""
        bits = self.qdata.numel() * 8
        bits += self.scale_dq.storage_bits() if self.scale_dq is not None else self.scale.numel() * 16
        if self.zero is not None:
            bits += self.zero.numel() * self.zero.element_size() * 8
        return bits

    @property
    def bits_per_weight(self) -> float:
        return self.storage_bits() / (self.shape[0] * self.shape[1])

    def tensors(self) -> dict[str, Tensor]:
        """The stored tensors by name, as a checkpoint or a module's buffers hold them."""
        out = {"qdata": self.qdata}
        if self.scale is not None:
            out["scale"] = self.scale
        if self.scale_dq is not None:
            out["scale_codes"] = self.scale_dq.codes
            out["scale_block_scale"] = self.scale_dq.block_scale
            out["scale_offset"] = self.scale_dq.offset
        if self.zero is not None:
            out["zero"] = self.zero
        return out

    @classmethod
    def from_tensors(cls, scheme: QuantScheme, shape: tuple[int, int], tensors: dict[str, Tensor]) -> QuantizedWeight:
        """Inverse of ``tensors``; checks every shape and dtype against the scheme.

        Raises:
            ValueError: a tensor is missing, extra, or of the wrong shape or dtype.
        """
        expected = expected_tensors(scheme, shape)
        missing, extra = set(expected) - set(tensors), set(tensors) - set(expected)
        if missing or extra:
            raise ValueError(f"expected tensors {sorted(expected)}, missing {sorted(missing)}, "
                             f"unexpected {sorted(extra)}")
        for name, (want_shape, want_dtype) in expected.items():
            t = tensors[name]
            if tuple(t.shape) != want_shape or t.dtype != want_dtype:
                raise ValueError(
                    f"tensor {name!r} is {t.dtype} {tuple(t.shape)}, expected {want_dtype} {want_shape} "
                    f"for {scheme.describe()}"
                )
        scale_dq = None
        if scheme.double_quant:
            R, G = rows_shape(shape, scheme)
            scale_dq = DoubleQuantScales(tensors["scale_codes"], tensors["scale_block_scale"],
                                         tensors["scale_offset"], (R, G))
        return cls(scheme, shape, tensors["qdata"], tensors.get("scale"), scale_dq, tensors.get("zero"))


def expected_tensors(scheme: QuantScheme, shape: tuple[int, int]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of every tensor a ``QuantizedWeight`` of this scheme and shape stores."""
    out_features, in_features = shape
    R, G = rows_shape(shape, scheme)
    spec: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
        "qdata": ((out_features, packed_length(in_features, scheme.bits)), torch.uint8)}
    if scheme.double_quant:
        n_blocks = -(-(R * G) // DQ_BLOCK)
        spec["scale_codes"] = ((n_blocks * DQ_BLOCK,), torch.uint8)
        spec["scale_block_scale"] = ((n_blocks,), torch.float32)
        spec["scale_offset"] = ((1,), torch.float32)
    else:
        spec["scale"] = ((R, G), torch.float16)
    if not scheme.symmetric:
        if scheme.zero_point is ZeroPoint.INT:
            spec["zero"] = ((R, packed_length(G, scheme.bits)), torch.uint8)
        else:
            spec["zero"] = ((R, G), torch.float16)
    return spec

"""``QuantizedWeight``: the one value every path in lowbit passes along (see DESIGN.md).

Methods produce it, modules run it, exporters write it, evaluators measure it. It holds packed
codes plus what gives them meaning; nothing else is needed to rebuild the float weight.

What it stores is declared once, in ``FIELDS``: a field's name, dtype, shape rule and when it is
present. That table builds module buffers, names checkpoint tensors, validates loaded ones and
counts bits, so a new kind of stored tensor is one line there (plus its use in ``dequantize``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from lowbit.formats import DoubleQuantScales, FormatName, pack, packed_length, unpack
from lowbit.formats.codebook import lookup
from lowbit.formats.double_quant import DQ_BLOCK
from lowbit.quantizer import dequantize_values, rows_shape
from lowbit.scheme import QuantScheme, ZeroPoint


@dataclass(frozen=True)
class WeightLayout:
    """What fixes the shapes of a weight's stored tensors: its scheme, its ``(out, in)`` shape and the
    data-dependent counts (``outliers``: entries of the sparse part), which checkpoints record per layer.

    ``R, G = rows_shape(shape, scheme)``: ``R`` scale rows (``out`` or 1 per tensor), ``G`` groups per row.
    """

    scheme: QuantScheme
    shape: tuple[int, int]
    outliers: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", (int(self.shape[0]), int(self.shape[1])))
        if self.outliers and not self.scheme.sparse:
            raise ValueError(f"{self.outliers} outliers recorded for a scheme without a sparse part "
                             f"({self.scheme.describe()})")
        d = self.scheme.weights_per_code
        if self.shape[1] % d:
            raise ValueError(f"vector_dim {d} does not divide in_features={self.shape[1]}")
        rows_shape(self.shape, self.scheme)  # raises on a group size that does not divide in_features
        if self.scheme.format is FormatName.VQ and 2**self.scheme.bits > self.vectors_per_codebook:
            raise ValueError(f"a codebook of 2**{self.scheme.bits} = {2**self.scheme.bits} vectors is larger than the "
                             f"{self.vectors_per_codebook} weight vectors it would code in a {self.shape[0]}x"
                             f"{self.shape[1]} weight ({self.scheme.describe()}); use fewer codebook bits, a smaller "
                             "vector_dim or larger codebook groups")

    @property
    def rows(self) -> tuple[int, int]:
        return rows_shape(self.shape, self.scheme)

    @property
    def n_scale_rows(self) -> int:
        R, G = self.rows
        return R * G

    @property
    def n_codebooks(self) -> int:
        """Codebooks stored: one per scale row, or with ``shared_codebook`` one per group of columns."""
        return self.rows[1] if self.scheme.shared_codebook else self.n_scale_rows

    @property
    def vectors_per_codebook(self) -> int:
        """Weight vectors (``weights_per_code`` weights each) that one codebook codes."""
        return self.shape[0] * self.shape[1] // (self.scheme.weights_per_code * self.n_codebooks)


def _dq_blocks(layout: WeightLayout) -> int:
    return -(-layout.n_scale_rows // DQ_BLOCK)


def _super_blocks(layout: WeightLayout) -> tuple[int, int]:
    R, G = layout.rows
    if G % layout.scheme.super_group:
        raise ValueError(f"super_group {layout.scheme.super_group} does not divide the {G} groups of a row")
    return R, G // layout.scheme.super_group


def _affine(s: QuantScheme) -> bool:
    return not s.is_codebook


def _one_level_scale(s: QuantScheme) -> bool:
    return _affine(s) and not s.double_quant and s.super_group is None


@dataclass(frozen=True)
class Field:
    """One stored tensor: ``shape(layout)`` and ``dtype``, present when ``present(scheme)``."""

    name: str
    dtype: torch.dtype
    shape: Callable[[WeightLayout], tuple[int, ...]]
    present: Callable[[QuantScheme], bool]
    doc: str


FIELDS: tuple[Field, ...] = (
    Field("qdata", torch.uint8,
          lambda l: (l.shape[0], packed_length(l.shape[1] // l.scheme.weights_per_code, l.scheme.bits)),
          lambda s: True, "codes packed along the input dimension (vq: one code per vector_dim weights)"),
    Field("scale", torch.float16, lambda l: l.rows, lambda s: _one_level_scale(s) and not s.float32_scales,
          "one scale per scale row and group"),
    Field("scale", torch.float32, lambda l: l.rows, lambda s: _one_level_scale(s) and s.float32_scales,
          "float32_scales: one float32 scale per scale row and group (bitsandbytes' absmax, kept exactly)"),
    Field("scale_codes", torch.uint8, lambda l: (_dq_blocks(l) * DQ_BLOCK,),
          lambda s: _affine(s) and s.double_quant, "double quantization: 8-bit scale codes"),
    Field("scale_block_scale", torch.float32, lambda l: (_dq_blocks(l),),
          lambda s: _affine(s) and s.double_quant, "double quantization: one scale per 256 scales"),
    Field("scale_offset", torch.float32, lambda l: (1,),
          lambda s: _affine(s) and s.double_quant, "double quantization: the scales' mean"),
    Field("super_scale", torch.float16, _super_blocks, lambda s: _affine(s) and s.super_group is not None,
          "two-level scales: a float scale per super-block (llama.cpp's d)"),
    Field("sub_scale", torch.uint8, lambda l: (l.rows[0], packed_length(l.rows[1], l.scheme.sub_scale_bits)),
          lambda s: _affine(s) and s.super_group is not None,
          "two-level scales: each group's scale code; scale = super_scale * code (or code - 2**(bits-1): signed)"),
    Field("super_min", torch.float16, _super_blocks,
          lambda s: _affine(s) and s.super_group is not None and not s.symmetric,
          "two-level minimums: a float per super-block (llama.cpp's dmin)"),
    Field("sub_min", torch.uint8, lambda l: (l.rows[0], packed_length(l.rows[1], l.scheme.sub_scale_bits)),
          lambda s: _affine(s) and s.super_group is not None and not s.symmetric,
          "two-level minimums: each group's code; minimum = -super_min * code"),
    Field("zero", torch.uint8, lambda l: (l.rows[0], packed_length(l.rows[1], l.scheme.bits)),
          lambda s: _affine(s) and not s.symmetric and s.zero_point is ZeroPoint.INT,
          "integer zero-points, packed like the codes"),
    Field("zero", torch.float16, lambda l: l.rows,
          lambda s: _affine(s) and not s.symmetric and s.zero_point is ZeroPoint.FLOAT and s.super_group is None,
          "float minimums"),
    Field("codebook", torch.float16, lambda l: (l.n_scale_rows, 2**l.scheme.bits),
          lambda s: s.format is FormatName.LUT, "lut: each scale row's table of 2**bits values"),
    Field("codebook", torch.float16, lambda l: (l.n_codebooks, 2**l.scheme.bits, l.scheme.vector_dim),
          lambda s: s.format is FormatName.VQ,
          "vq: 2**bits vectors of vector_dim values per scale row (shared_codebook: per group of columns)"),
    Field("g_idx", torch.int32, lambda l: (l.shape[1],), lambda s: s.group_index,
          "group of each input column (GPTQ's act-order layout)"),
    Field("outlier_values", torch.float16, lambda l: (l.outliers,), lambda s: s.sparse,
          "sparse part: exact values added to the dense weight"),
    Field("outlier_index", torch.int32, lambda l: (l.outliers,), lambda s: s.sparse,
          "sparse part: flat positions row * in_features + column, ascending"),
)


def fields_for(scheme: QuantScheme) -> list[Field]:
    """The fields a weight of ``scheme`` stores, in table order."""
    return [f for f in FIELDS if f.present(scheme)]


def expected_tensors(layout: WeightLayout) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of every tensor a ``QuantizedWeight`` of this layout stores."""
    return {f.name: (tuple(f.shape(layout)), f.dtype) for f in fields_for(layout.scheme)}


def storage_bits_of(spec: Mapping[str, tuple[tuple[int, ...], torch.dtype]]) -> int:
    """Bits of the tensors ``expected_tensors`` describes: everything stored counts."""
    total = 0
    for shape, dtype in spec.values():
        n = 1
        for d in shape:
            n *= d
        total += n * dtype.itemsize * 8
    return total


@dataclass
class QuantizedWeight:
    """A weight ``[out_features, in_features]`` as the tensors ``FIELDS`` declares for its layout.

    ``data`` maps field names to tensors; fields read as attributes (``qw.qdata``, ``qw.scale`` ...),
    None when the scheme does not store them. ``from_tensors`` validates; the constructor trusts its
    caller (modules rebuild a view of already validated buffers on every forward).
    """

    layout: WeightLayout
    data: dict[str, Tensor] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Tensor | None:
        if name in _FIELD_NAMES:
            return self.__dict__.get("data", {}).get(name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    @property
    def scheme(self) -> QuantScheme:
        return self.layout.scheme

    @property
    def shape(self) -> tuple[int, int]:
        return self.layout.shape

    @classmethod
    def from_codes(cls, codes: Tensor, scale: Tensor, zero: Tensor | None, scheme: QuantScheme) -> QuantizedWeight:
        """Pack unpacked uint8 ``codes [out, in]`` of a grid scheme with float ``scale``/``zero`` ``[R, G]``."""
        layout = WeightLayout(scheme, tuple(codes.shape))
        R, G = layout.rows
        scale = scale.reshape(R, G)
        data = {"qdata": pack(codes, scheme.bits)}
        if scheme.double_quant:
            dq = DoubleQuantScales.from_scales(scale)
            data.update(scale_codes=dq.codes, scale_block_scale=dq.block_scale, scale_offset=dq.offset)
        else:
            data["scale"] = scale.float() if scheme.float32_scales else scale.half()
        if zero is not None:
            zero = zero.reshape(R, G)
            data["zero"] = pack(zero.to(torch.uint8), scheme.bits) if scheme.zero_point is ZeroPoint.INT else zero.half()
        return cls(layout, data)

    @classmethod
    def from_codebook(cls, codes: Tensor, codebook: Tensor, scheme: QuantScheme) -> QuantizedWeight:
        """A ``lut``/``vq`` weight: uint8 ``codes [out, in / vector_dim]`` indexing ``codebook``
        (``[R*G, 2**bits]`` tables or ``[R*G, 2**bits, vector_dim]`` vectors, one per scale row; with
        ``shared_codebook`` ``[G, 2**bits, vector_dim]``, one per group of columns)."""
        if not scheme.is_codebook:
            raise ValueError(f"from_codebook needs a lut or vq scheme, got {scheme.describe()}")
        shape = (codes.shape[0], codes.shape[1] * scheme.weights_per_code)
        return cls.from_tensors(scheme, shape, {"qdata": pack(codes, scheme.bits), "codebook": codebook.half()})

    @classmethod
    def from_tensors(cls, scheme: QuantScheme, shape: tuple[int, int], tensors: Mapping[str, Tensor],
                     outliers: int | None = None) -> QuantizedWeight:
        """Build from stored tensors, checking every name, shape and dtype against ``FIELDS``.

        ``outliers`` (the sparse part's entry count) defaults to the length of ``outlier_values``.

        Raises:
            ValueError: a tensor is missing, extra, or of the wrong shape or dtype.
        """
        if outliers is None:
            outliers = tensors["outlier_values"].numel() if "outlier_values" in tensors else 0
        layout = WeightLayout(scheme, shape, outliers)
        expected = expected_tensors(layout)
        missing, extra = set(expected) - set(tensors), set(tensors) - set(expected)
        if missing or extra:
            raise ValueError(f"expected tensors {sorted(expected)}, missing {sorted(missing)}, "
                             f"unexpected {sorted(extra)}")
        for name, (want_shape, want_dtype) in expected.items():
            t = tensors[name]
            if tuple(t.shape) != want_shape or t.dtype != want_dtype:
                raise ValueError(f"tensor {name!r} is {t.dtype} {tuple(t.shape)}, expected {want_dtype} "
                                 f"{want_shape} for {scheme.describe()}")
        return cls(layout, {name: tensors[name] for name in expected})

    def with_outliers(self, values: Tensor, index: Tensor) -> QuantizedWeight:
        """This weight plus a sparse part: float ``values`` added at flat positions ``index``
        (``row * in_features + column``); the scheme gains ``sparse``."""
        order = index.long().argsort()
        data = dict(self.data, outlier_values=values.reshape(-1)[order].half(),
                    outlier_index=index.reshape(-1)[order].to(torch.int32))
        return QuantizedWeight.from_tensors(replace(self.scheme, sparse=True), self.shape, data)

    def codes(self) -> Tensor:
        """Unpacked uint8 codes ``[out_features, in_features / vector_dim]``."""
        return unpack(self.qdata, self.scheme.bits, self.shape[1] // self.scheme.weights_per_code)

    def scales(self, rows: Tensor | None = None) -> Tensor:
        """Float32 scales ``[R, G]`` (only scale rows ``rows`` when given), decoded from their 8-bit or
        two-level form where stored so."""
        R, G = self.layout.rows
        if self.scale_codes is not None:  # the 8-bit codes run across rows in blocks of 256: decode all
            scales = DoubleQuantScales(self.scale_codes, self.scale_block_scale, self.scale_offset, (R, G)).dequantize()
            return scales if rows is None else scales[rows]
        if self.super_scale is not None:
            return self._two_level(_take(self.super_scale, rows), _take(self.sub_scale, rows))
        if self.scale is None:
            raise ValueError(f"{self.scheme.describe()} stores a codebook, not scales")
        return _take(self.scale, rows).float()

    def zeros(self, rows: Tensor | None = None) -> Tensor | None:
        """Float32 zero-points (INT) or minimums (FLOAT) ``[R, G]`` (only scale rows ``rows`` when given),
        or None when symmetric or a codebook."""
        if self.super_min is not None:
            return -self._two_level(_take(self.super_min, rows), _take(self.sub_min, rows))
        if self.zero is None:
            return None
        if self.scheme.zero_point is ZeroPoint.INT:
            return unpack(_take(self.zero, rows), self.scheme.bits, self.layout.rows[1]).float()
        return _take(self.zero, rows).float()

    def _two_level(self, per_super: Tensor, sub_codes: Tensor) -> Tensor:
        bits = self.scheme.sub_scale_bits
        codes = unpack(sub_codes, bits, self.layout.rows[1]).float()
        if self.scheme.sub_scale_signed:
            codes = codes - 2 ** (bits - 1)
        return codes * per_super.float().repeat_interleave(self.scheme.super_group, dim=1)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The float weight ``[out_features, in_features]`` these tensors stand for."""
        R, G = self.layout.rows
        if self.scheme.shared_codebook:
            weight = self._dequantize_shared()
        elif self.scheme.is_codebook:
            n = self.shape[1] // self.scheme.weights_per_code
            codes = unpack(self.qdata, self.scheme.bits, n).reshape(R * G, -1)
            weight = lookup(codes, self.codebook).reshape(self.shape)
        elif self.g_idx is not None:
            weight = self._dequantize_by_index()
        else:
            zero = self.zeros()
            values = self.scheme.number_format().decode_packed(self.qdata, self.shape[1]).reshape(R * G, -1)
            weight = dequantize_values(values, self.scales().reshape(-1), None if zero is None else zero.reshape(-1),
                                       self.scheme).reshape(self.shape)
        if self.outlier_values is not None and self.outlier_values.numel():
            weight = weight.reshape(-1).index_add(0, self.outlier_index.long(), self.outlier_values.float())
            weight = weight.reshape(self.shape)
        return weight.to(dtype)

    def dequantize_rows(self, index: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """Rows ``index`` (int ``[n]``) of the float weight, ``[n, in_features]``, decoding only those rows'
        codes where each output row has its own scales (what an embedding lookup needs)."""
        plain = (not self.scheme.is_codebook and self.g_idx is None and self.outlier_values is None
                 and self.scheme.granularity.value != "tensor")
        if not plain:
            return self.dequantize(dtype)[index]
        G = self.layout.rows[1]
        scale, zero = self.scales(index), self.zeros(index)
        values = self.scheme.number_format().decode_packed(self.qdata[index], self.shape[1])
        rows = dequantize_values(values.reshape(index.numel() * G, -1), scale.reshape(-1),
                                 None if zero is None else zero.reshape(-1), self.scheme)
        return rows.reshape(index.numel(), self.shape[1]).to(dtype)

    def _dequantize_shared(self) -> Tensor:
        """Codes of column group ``g`` (every row) index codebook ``g``: regroup them as one row per
        codebook for ``lookup``, then back to ``[out, in]``."""
        out, n = self.shape
        G = self.layout.rows[1]
        codes = self.codes().reshape(out, G, -1).transpose(0, 1).reshape(G, -1)
        return lookup(codes, self.codebook).reshape(G, out, n // G).transpose(0, 1).reshape(out, n)

    def _dequantize_by_index(self) -> Tensor:
        """Grid codes whose group is ``g_idx[column]`` rather than ``column // group_size``."""
        values = self.scheme.number_format().decode_packed(self.qdata, self.shape[1])
        g = self.g_idx.long()
        scale = self.scales()[:, g]
        zero = self.zeros()
        if zero is None:
            return values * scale
        if self.scheme.zero_point is ZeroPoint.INT:
            return (values - zero[:, g]) * scale
        return values * scale + zero[:, g]

    def storage_bits(self) -> int:
        """Every bit stored: codes, scales in whatever form, zero-points, codebooks, indices, outliers."""
        return sum(t.numel() * t.element_size() * 8 for t in self.data.values())

    @property
    def bits_per_weight(self) -> float:
        return self.storage_bits() / (self.shape[0] * self.shape[1])

    @property
    def scale_dq(self) -> DoubleQuantScales | None:
        """The double-quantized scales as one value, or None."""
        if self.scale_codes is None:
            return None
        return DoubleQuantScales(self.scale_codes, self.scale_block_scale, self.scale_offset, self.layout.rows)

    def tensors(self) -> dict[str, Tensor]:
        """The stored tensors by name, as a checkpoint or a module's buffers hold them."""
        return dict(self.data)

    def to(self, device: torch.device | str) -> QuantizedWeight:
        """This weight with its tensors on ``device``: the bytes move, nothing is re-quantized (tensors
        already there are kept as they are)."""
        return QuantizedWeight(self.layout, {name: t.to(device) for name, t in self.data.items()})


_FIELD_NAMES = frozenset(f.name for f in FIELDS)


def _take(t: Tensor, rows: Tensor | None) -> Tensor:
    """``t``, or its rows ``rows``."""
    return t if rows is None else t[rows]

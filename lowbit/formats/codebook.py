"""Codebook formats: the grid is data stored with each weight, not a table fixed by the format.

- ``lut``: every scale row of the scheme (a row, a group of a row, or the whole tensor, as
  ``rows_shape`` says) has its own sorted table of ``2**bits`` values (SqueezeLLM's non-uniform
  levels, k-means centroids); a code indexes its row's table.
- ``vq``: a codebook of ``2**bits`` vectors of ``vector_dim`` values per scale row; one code stands
  for ``vector_dim`` consecutive weights along the input dimension (vector/product quantization as in
  GPTVQ), so a code costs ``bits / vector_dim`` bits per weight. With the scheme's ``shared_codebook``
  every row shares its group's codebook instead (product quantization: one per slice of the input
  dimension).

The tables live in the ``QuantizedWeight`` (field ``codebook``); the format only knows the code
width, so ``encode``/``decode`` without a table are refused and ``nearest_codes``/``lookup`` take it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowbit.formats.base import FormatName, NumberFormat, register_format

MAX_CODEBOOK_BITS = 8  # codes are packed into uint8 like every other format


class CodebookFormat(NumberFormat):
    """Codes of ``bits`` bits that index a codebook stored beside them."""

    signed = True

    def __init__(self, name: FormatName, bits: int) -> None:
        if not 1 <= bits <= MAX_CODEBOOK_BITS:
            raise ValueError(f"{name.value} codebooks take 1 to {MAX_CODEBOOK_BITS} bits per code, got bits={bits}")
        self.name = name  # type: ignore[misc]
        self.bits = bits

    @property
    def max_value(self) -> float:
        return 1.0  # no fixed range: the codebook holds the values themselves

    @property
    def min_value(self) -> float:
        return -1.0

    def encode(self, x: Tensor) -> Tensor:
        raise TypeError(f"{self.name.value} codes index a weight's own codebook; use nearest_codes(x, codebook)")

    def decode(self, codes: Tensor) -> Tensor:
        raise TypeError(f"{self.name.value} codes index a weight's own codebook; use lookup(codes, codebook)")


def nearest_codes(x: Tensor, codebook: Tensor) -> Tensor:
    """Codes of the nearest codebook entry, row by row.

    Scalar tables: ``x [rows, n]``, ``codebook [rows, K]`` -> uint8 ``[rows, n]``.
    Vector codebooks: ``x [rows, n]``, ``codebook [rows, K, d]`` -> uint8 ``[rows, n / d]``
    (nearest in Euclidean distance; ties go to the lower code, as ``argmin`` does).
    """
    x = x.float()
    codebook = codebook.float()
    if codebook.dim() == 2:
        return (x[:, :, None] - codebook[:, None, :]).abs().argmin(-1).to(torch.uint8)
    rows, K, d = codebook.shape
    vectors = x.reshape(rows, -1, d)
    return torch.cdist(vectors, codebook).argmin(-1).to(torch.uint8)


def lookup(codes: Tensor, codebook: Tensor) -> Tensor:
    """Float32 values of ``codes [rows, m]``: ``[rows, m]`` for scalar tables ``[rows, K]``, ``[rows, m * d]``
    for vector codebooks ``[rows, K, d]``."""
    codebook = codebook.float()
    if codebook.dim() == 2:
        return torch.gather(codebook, 1, codes.long())
    rows, K, d = codebook.shape
    index = codes.long() + torch.arange(rows, device=codes.device)[:, None] * K
    return codebook.reshape(rows * K, d)[index].reshape(rows, -1)


@register_format(FormatName.LUT)
def _lut(bits: int, symmetric: bool) -> CodebookFormat:
    return CodebookFormat(FormatName.LUT, bits)


@register_format(FormatName.VQ)
def _vq(bits: int, symmetric: bool) -> CodebookFormat:
    return CodebookFormat(FormatName.VQ, bits)

"""Bit packing of codes into bytes, for every width from 1 to 8 bits.

Codes are packed along the last dimension, little-endian: code ``i`` of a unit occupies bits
``[i*bits, (i+1)*bits)`` of the unit. A unit is the smallest whole number of codes that fills whole
bytes: ``8 / gcd(bits, 8)`` codes in ``bits / gcd(bits, 8)`` bytes. So 4-bit codes go two to a byte
(low nibble first, as GPTQ and llama.cpp's Q4_1 ``qs`` low half), 6-bit codes four to three bytes,
and 3-bit codes eight to three bytes: no width wastes space. The last dimension is padded with zero
codes to whole units; ``unpack`` takes the original length to drop them.
"""

from __future__ import annotations

from math import gcd

import torch
from torch import Tensor


def unit_shape(bits: int) -> tuple[int, int]:
    """(codes, bytes) of one packing unit at ``bits`` bits."""
    if not 1 <= bits <= 8:
        raise ValueError(f"can pack codes of 1 to 8 bits, got bits={bits}")
    g = gcd(bits, 8)
    return 8 // g, bits // g


def packed_length(n: int, bits: int) -> int:
    """Bytes that ``n`` codes of ``bits`` bits occupy along the packed dimension."""
    codes, nbytes = unit_shape(bits)
    return -(-n // codes) * nbytes


def pack(codes: Tensor, bits: int) -> Tensor:
    """Pack uint8 ``codes`` (values < 2**bits) of shape ``[..., n]`` into uint8 ``[..., packed_length(n)]``."""
    unit_codes, unit_bytes = unit_shape(bits)
    if codes.dtype != torch.uint8:
        raise TypeError(f"pack expects uint8 codes, got {codes.dtype}")
    *lead, n = codes.shape
    codes = torch.nn.functional.pad(codes, (0, -n % unit_codes))
    if unit_bytes == 1:  # whole codes per byte (1, 2, 4, 8 bits): shifts on uint8, no int64 detour
        units = codes.reshape(*lead, -1, unit_codes)
        out = units[..., 0].clone()
        for i in range(1, unit_codes):
            out |= units[..., i] << (i * bits)
        return out
    units = codes.reshape(*lead, -1, unit_codes).to(torch.int64)
    shifts = torch.arange(unit_codes, dtype=torch.int64, device=codes.device) * bits
    word = (units << shifts).sum(dim=-1, keepdim=True)  # at most 8 * 7 = 56 bits: fits int64
    byte_shifts = torch.arange(unit_bytes, dtype=torch.int64, device=codes.device) * 8
    return ((word >> byte_shifts) & 0xFF).to(torch.uint8).reshape(*lead, -1)


def unpack(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of ``pack``: uint8 ``[..., packed_length(n)]`` -> uint8 codes ``[..., n]``.

    Raises:
        ValueError: the row length does not match ``n`` codes of ``bits`` bits (corrupt data).
    """
    unit_codes, unit_bytes = unit_shape(bits)
    if packed.shape[-1] != packed_length(n, bits):
        raise ValueError(
            f"packed data has {packed.shape[-1]} bytes per row, expected {packed_length(n, bits)} "
            f"for {n} codes of {bits} bits; the file is corrupt or was written with another layout"
        )
    *lead, _ = packed.shape
    if unit_bytes == 1:  # whole codes per byte (1, 2, 4, 8 bits): shifts on uint8, no int64 detour
        mask = (1 << bits) - 1
        parts = [(packed >> (i * bits)) & mask for i in range(unit_codes)]
        return torch.stack(parts, dim=-1).reshape(*lead, -1)[..., :n]
    units = packed.reshape(*lead, -1, unit_bytes).to(torch.int64)
    byte_shifts = torch.arange(unit_bytes, dtype=torch.int64, device=packed.device) * 8
    word = (units << byte_shifts).sum(dim=-1, keepdim=True)
    shifts = torch.arange(unit_codes, dtype=torch.int64, device=packed.device) * bits
    codes = ((word >> shifts) & ((1 << bits) - 1)).to(torch.uint8)
    return codes.reshape(*lead, -1)[..., :n]

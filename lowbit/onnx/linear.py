"""A linear layer as ONNX Runtime nodes carrying lowbit's own codes and scales (nothing re-quantized).

- 4-bit and 8-bit integer codes -> ``com.microsoft.MatMulNBits``: ``B`` uint8 ``[N, K/block,
  block*bits/8]`` holds the codes along the input dimension, two to a byte low nibble first at 4
  bits, which is lowbit's packing (``lowbit.formats.packing``), so ``qdata``'s bytes are copied as
  they are; ``scales`` float32 ``[N * K/block]``; ``zero_points`` uint8 ``[N * ceil(K/block * bits/8)]``
  packed the same way. A symmetric scheme's offset-binary codes (``q + 2**(bits-1)``) are read with
  MatMulNBits' default zero point ``2**(bits-1)``, so none is stored. Per-channel and per-tensor
  scales are repeated over blocks of the largest power of two from 16 to 256 dividing ``K``
  (MatMulNBits' blocks are powers of two). The node's ``accuracy_level`` is the export's.
- 8-bit codes whose groups are no MatMulNBits block (e.g. 96) -> ``DequantizeLinear`` (opset 21,
  blocked along the input dimension) of the transposed codes, then ``MatMul``: symmetric codes as
  int8 ``q`` (lowbit stores ``q + 128``), asymmetric ones as uint8 with their uint8 zero-points.
  (onnxruntime fuses the pair into MatMulNBits at its session's ``session.qdq_matmulnbits_accuracy_level``.)
- a float ``nn.Linear`` -> ``MatMul`` by its transposed float32 weight.

Scales are decoded to float32 (``QuantizedWeight.scales``: float16, 8-bit double-quantized and
two-level scales alike), which both operators take as they are, so the weight ONNX Runtime
reconstructs is the one lowbit's ``dequantize`` gives. What has no such operator (codebooks,
minifloats, float minimums, other widths, act-order indices, sparse outliers) is refused by
``lowbit.onnx.schemes.onnx_mismatch`` with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from lowbit.formats import pack
from lowbit.nn import QuantLinear
from lowbit.onnx.graph import MS_DOMAIN, GraphBuilder
from lowbit.onnx.schemes import nbits_block
from lowbit.qweight import QuantizedWeight
from lowbit.scheme import Granularity

@dataclass(frozen=True)
class NBitsTensors:
    """What MatMulNBits reads for one weight ``[N, K]`` of ``bits`` 4 or 8: ``B`` uint8 ``[N, K/block,
    block*bits/8]``, ``scales`` float32 ``[N * K/block]``, ``zero_points`` uint8 ``[N * ceil(K/block *
    bits/8)]`` or None (symmetric)."""

    B: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    block: int
    bits: int


def nbits_tensors(qw: QuantizedWeight) -> NBitsTensors:
    """``qw`` (``onnx_mismatch`` None, ``nbits_block`` not None) in MatMulNBits' layout; the codes are
    ``qdata`` reshaped."""
    N, K = qw.shape
    bits = qw.scheme.bits
    block = nbits_block(qw.scheme, K)
    blocks = K // block
    B = qw.qdata.numpy().reshape(N, blocks, block * bits // 8)
    scales = _per_block(qw.scales(), N, blocks)
    zeros = qw.zeros()
    zero_points = None
    if zeros is not None:
        zero_points = pack(_per_block(zeros, N, blocks).round().to(torch.uint8), bits).numpy().reshape(-1)
    return NBitsTensors(B, scales.numpy().reshape(-1), zero_points, block, bits)


def _per_block(values: torch.Tensor, rows: int, blocks: int) -> torch.Tensor:
    """Per-tensor ``[1, 1]``, per-channel ``[N, 1]`` or per-group ``[N, blocks]`` values as ``[N, blocks]``."""
    values = values.float().expand(rows, values.shape[1])
    return values.repeat_interleave(blocks // values.shape[1], dim=1).contiguous()


@dataclass(frozen=True)
class DequantTensors:
    """What DequantizeLinear reads for one 8-bit weight, transposed to ``[K, N]``: ``codes`` int8
    (symmetric) or uint8, ``scale`` float32 (scalar, ``[N]`` or ``[K/group, N]``), ``zero_point``
    uint8 of the same shape or None, and the node's ``axis`` and ``block_size`` (0: not blocked)."""

    codes: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray | None
    axis: int
    block_size: int


def dequant_tensors(qw: QuantizedWeight) -> DequantTensors:
    """``qw`` (8-bit, ``onnx_mismatch`` None) in DequantizeLinear's layout, transposed for ``x @ W^T``."""
    scheme = qw.scheme
    codes = qw.codes().T.contiguous()  # [K, N] uint8, lowbit's codes
    if scheme.symmetric:
        codes = (codes.to(torch.int16) - 128).to(torch.int8)  # offset binary -> the signed q itself
    scale, zero = qw.scales(), qw.zeros()
    if scheme.granularity is Granularity.TENSOR:
        shaped, axis, block = (lambda t: t.reshape(())), 0, 0
    elif scheme.granularity is Granularity.CHANNEL:
        shaped, axis, block = (lambda t: t.reshape(-1)), 1, 0
    else:
        shaped, axis, block = (lambda t: t.T.contiguous()), 0, int(scheme.group_size)
    zero_point = None if zero is None else shaped(zero.round().to(torch.uint8)).numpy()
    return DequantTensors(codes.numpy(), shaped(scale.float()).numpy(), zero_point, axis, block)


def add_linear(g: GraphBuilder, x: str, layer: nn.Module, name: str, accuracy_level: int) -> str:
    """Append ``layer(x)`` to ``g`` for ``x`` float32 ``[..., in_features]``; returns the output name.
    ``accuracy_level`` is MatMulNBits' (0: float32 products ... 4: int8 activations). The caller has
    checked the scheme (``onnx_mismatch``, ``check_nbits_block``)."""
    if isinstance(layer, QuantLinear):
        qw = layer.quantized_weight()
        if nbits_block(qw.scheme, qw.shape[1]) is not None:
            y = add_nbits(g, x, qw, name, accuracy_level)
        else:
            y = add_dequant(g, x, qw, name)
    elif isinstance(layer, nn.Linear):
        y = g.op("MatMul", x, g.const(f"{name}.weight_t", layer.weight.detach().float().T.contiguous().numpy()),
                 name=name)
    else:
        raise TypeError(f"{name} is a {type(layer).__name__}, not a linear layer")
    if layer.bias is not None:
        y = g.op("Add", y, g.const(f"{name}.bias", layer.bias.detach().float().numpy()), name=f"{name}_bias")
    return y


def add_nbits(g: GraphBuilder, x: str, qw: QuantizedWeight, name: str, accuracy_level: int) -> str:
    """``x @ W^T`` by MatMulNBits over ``nbits_tensors(qw)``."""
    t = nbits_tensors(qw)
    N, K = qw.shape
    inputs = [g.shared(f"{name}.qweight", lambda: t.B), g.shared(f"{name}.scales", lambda: t.scales)]
    if t.zero_points is not None:
        inputs.append(g.shared(f"{name}.qzeros", lambda: t.zero_points))
    return g.op("MatMulNBits", x, *inputs, domain=MS_DOMAIN, name=name, K=K, N=N, bits=t.bits, block_size=t.block,
                accuracy_level=accuracy_level)


def add_dequant(g: GraphBuilder, x: str, qw: QuantizedWeight, name: str) -> str:
    """``x @ W^T`` by DequantizeLinear of ``dequant_tensors(qw)`` and MatMul."""
    t = dequant_tensors(qw)
    inputs = [g.shared(f"{name}.qweight_t", lambda: t.codes), g.const(f"{name}.scales", t.scale)]
    if t.zero_point is not None:
        inputs.append(g.const(f"{name}.qzeros", t.zero_point))
    attrs = {"axis": t.axis, **({"block_size": t.block_size} if t.block_size else {})}
    weight = g.op("DequantizeLinear", *inputs, name=f"{name}_weight", **attrs)
    return g.op("MatMul", x, weight, name=name)

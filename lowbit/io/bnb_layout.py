"""bitsandbytes checkpoints (transformers' ``save_pretrained`` of a 4-bit or 8-bit model) read as lowbit weights.

The layout is bitsandbytes' ``QuantState.as_dict(packed=True)`` (functional.py), per linear ``L``:

- 4-bit: ``L.weight`` uint8 ``[n / 2, 1]``, two codes a byte over the flattened ``[out, in]`` weight, the
  first in the *high* nibble; ``L.weight.absmax`` float32 ``[n / blocksize]``; ``L.weight.quant_map`` float32
  ``[16]`` (the code table); ``L.weight.quant_state.bitsandbytes__nf4`` (or ``__fp4``): JSON in uint8
  (``quant_type``, ``blocksize``, ``dtype``, ``shape``; with double quantization ``nested_blocksize``,
  ``nested_offset``). With double quantization ``absmax`` is uint8 codes of bitsandbytes' 8-bit dynamic
  map, decoded as ``nested_quant_map[code] * nested_absmax[block] + nested_offset``.
  bitsandbytes dequantizes ``quant_map[code] * absmax`` in float32.
- 8-bit (LLM.int8): ``L.weight`` int8 ``[out, in]`` and ``L.SCB`` float32 ``[out]``: ``w = q * SCB / 127``.

What lowbit keeps:

- NF4 whose ``quant_map`` is lowbit's NF4 table bit for bit, with blocks inside rows (``blocksize``
  divides ``in``): lowbit ``nf4 g<blocksize>`` codes with float32 scales (``float32_scales``), the absmax
  as stored: ``dequantize()`` is bitsandbytes' float32 product exactly.
- Double quantization: lowbit's own double quantization is a linear int8 code, not bitsandbytes'
  dynamic map, so the absmax are decoded (as bitsandbytes decodes them, in float32) and kept as float32
  scales: exact, at 32 instead of about 8.1 bits per block (said per layer).
- 8-bit: ``int8 per-channel`` codes with float32 scales ``SCB / 127``: ``q * (SCB / 127)`` rounds once
  where bitsandbytes' ``(q * SCB) / 127`` rounds twice, so values agree to float32 rounding, not bitwise.
- FP4 (bitsandbytes' table is not OCP E2M1: its smallest magnitude is 1/192, E2M1's 1/12), a table
  that is not lowbit's, or blocks that straddle rows: the weight is dequantized to float (said per layer).
"""

from __future__ import annotations

import json

import torch
from torch import Tensor

from lowbit.formats import FormatName, make_format, pack
from lowbit.qweight import QuantizedWeight
from lowbit.scheme import Granularity, QuantScheme

STATE_PREFIX = "weight.quant_state.bitsandbytes__"
INV_127 = 7.874015718698502e-3  # bitsandbytes' int8_vectorwise_dequant multiplies by this


def is_bnb_layer(names: set[str], layer: str) -> bool:
    """Whether the state dict's ``names`` hold a bitsandbytes-quantized linear ``layer``."""
    return f"{layer}.SCB" in names or any(n.startswith(f"{layer}.{STATE_PREFIX}") for n in names)


def bnb_weight(tensors: dict[str, Tensor], shape: tuple[int, int],
               layer: str) -> tuple[QuantizedWeight | Tensor, str | None]:
    """``(weight, note)`` of one bitsandbytes layer: a ``QuantizedWeight``, or the float32 weight where the
    codes do not map (``note`` then says why; also set where scales were decoded, see the module docstring).

    Raises:
        ValueError: a tensor missing, or of the wrong size or dtype, naming the layer.
    """
    if "SCB" in tensors:
        return _int8(tensors, shape, layer), None
    state_key = next((k for k in tensors if k.startswith(STATE_PREFIX)), None)
    if state_key is None:
        raise ValueError(f"{layer}: bitsandbytes tensor '{STATE_PREFIX}nf4' (or fp4) or 'SCB' is missing")
    state = json.loads(bytes(tensors[state_key].to(torch.uint8).tolist()).decode("utf-8"))
    nested = "nested_offset" in state
    for name in ("weight", "weight.absmax", "weight.quant_map") + (("weight.nested_absmax", "weight.nested_quant_map")
                                                                    if nested else ()):
        if name not in tensors:
            raise ValueError(f"{layer}: bitsandbytes tensor '{name}' is missing")
    out_features, in_features = shape
    n, blocksize = out_features * in_features, int(state["blocksize"])
    packed = tensors["weight"].contiguous().view(torch.uint8).reshape(-1)
    n_blocks = -(-n // blocksize)
    if packed.numel() != -(-n // 2) or tensors["weight.absmax"].numel() != n_blocks:
        raise ValueError(f"{layer}: bitsandbytes 4-bit weight holds {packed.numel()} bytes and "
                         f"{tensors['weight.absmax'].numel()} absmax for a {out_features}x{in_features} weight in "
                         f"blocks of {blocksize}, expected {-(-n // 2)} and {n_blocks}")
    absmax = _absmax(tensors, state, layer)
    codes = torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1)[:n]  # first code in the high nibble
    table = tensors["weight.quant_map"].float()
    lowbit_nf4 = make_format(FormatName.NF4, 4).table
    note = "double-quantized absmax (bitsandbytes' dynamic 8-bit map) decoded to float32 scales" if nested else None
    if state["quant_type"] != "nf4" or not torch.equal(table, lowbit_nf4) or in_features % blocksize:
        why = (f"its {state['quant_type']} table is not a lowbit format" if not torch.equal(table, lowbit_nf4)
               else f"blocks of {blocksize} straddle rows of {in_features}")
        weight = table[codes.long()] * absmax.repeat_interleave(blocksize)[:n]  # bitsandbytes' float32 product
        return weight.reshape(shape), f"dequantized to float32: {why}"
    scheme = QuantScheme(format=FormatName.NF4, bits=4, group_size=blocksize, float32_scales=True)
    data = {"qdata": pack(codes.to(torch.uint8).reshape(shape), 4),
            "scale": absmax.reshape(out_features, in_features // blocksize)}
    return QuantizedWeight.from_tensors(scheme, shape, data), note


def _absmax(tensors: dict[str, Tensor], state: dict, layer: str) -> Tensor:
    """The float32 absmax of each block, decoded from double quantization as bitsandbytes decodes it."""
    if "nested_offset" not in state:
        return tensors["weight.absmax"].float()
    codes = tensors["weight.absmax"].to(torch.uint8).reshape(-1).long()
    nested_absmax = tensors["weight.nested_absmax"].float().reshape(-1)
    nested_block = int(state["nested_blocksize"])
    if nested_absmax.numel() != -(-codes.numel() // nested_block):
        raise ValueError(f"{layer}: bitsandbytes tensor 'weight.nested_absmax' has {nested_absmax.numel()} values, "
                         f"expected {-(-codes.numel() // nested_block)} for blocks of {nested_block}")
    decoded = tensors["weight.nested_quant_map"].float()[codes] * nested_absmax.repeat_interleave(nested_block)[
        :codes.numel()]
    return decoded + torch.tensor(float(state["nested_offset"]), dtype=torch.float32)


def _int8(tensors: dict[str, Tensor], shape: tuple[int, int], layer: str) -> QuantizedWeight:
    weight, scb = tensors.get("weight"), tensors["SCB"]
    if weight is None or weight.dtype != torch.int8 or tuple(weight.shape) != shape or scb.numel() != shape[0]:
        raise ValueError(f"{layer}: bitsandbytes 8-bit layer needs int8 'weight' {shape} and float 'SCB' "
                         f"[{shape[0]}], got {None if weight is None else (weight.dtype, tuple(weight.shape))} and "
                         f"{scb.numel()} SCB")
    scheme = QuantScheme(bits=8, granularity=Granularity.CHANNEL, float32_scales=True)
    scale = scb.float().reshape(-1, 1) * INV_127
    data = {"qdata": (weight.view(torch.uint8) ^ 0x80).contiguous(), "scale": scale}  # int8 q -> offset binary
    return QuantizedWeight.from_tensors(scheme, shape, data)

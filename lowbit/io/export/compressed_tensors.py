"""compressed-tensors directories as an exporter: the format llm-compressor writes and vLLM and transformers
read (``quant_method: compressed-tensors``), from lowbit's codes without re-quantizing.

Per quantized linear, by the scheme group it falls in (compressed-tensors 0.19's compressors):

- ``pack-quantized`` (integer weights, 2..8 bits, groups or per channel, symmetric or integer zero-points):
  ``weight_packed`` int32 ``[out, in * b / 32]`` (32 codes in ``b`` words as one little-endian bit stream,
  values stored ``q + 2**(b-1)``: exactly lowbit's offset-binary codes packed by ``lowbit.formats.pack``),
  ``weight_scale`` ``[out, G]``, ``weight_zero_point`` (asymmetric) int32 ``[out * b / 32, G]`` packed along
  the output dimension, ``weight_shape`` int64 ``[2]``; ``w = (q - zp) * scale`` with ``q = code - 2**(b-1)``.
- ``int-quantized`` (W8A8 int8): ``weight`` int8 ``[out, in]`` (two's complement ``code - 128``),
  ``weight_scale`` ``[out, 1]``, and for static activation scales ``input_scale`` ``[1]``.
- ``float-quantized`` (FP8 E4M3 weights, optionally W8A8 FP8): ``weight`` float8_e4m3fn (lowbit's codes are
  the OCP bit layout, so the bytes move as they are), ``weight_scale`` ``[out, 1]`` or ``[1]``.

Scales are written in the model's float dtype (float16 values, exactly representable), so the client's
dequantization ``(q - zp) * scale`` rounds exactly as lowbit's. Schemes outside these (non-int/FP8 grids,
8-bit or two-level scales, float minimums, act-order ``g_idx``, sparse parts) are refused in one line.

Input activations (W8A8) are written in the form vLLM, the format's serving runtime, runs as lowbit's
``ActScheme``: symmetric, dynamic per token (``strategy: token``, scale ``max|x| / 127`` or ``/ 448``) or
static per tensor (``strategy: tensor``, the calibrated ``input_scale``); int8 rounds half to even and
clamps to [-128, 127] before the exact int32 product (vLLM's CUDA kernel multiplies by ``127 / max|x|``
where lowbit divides, so a value within a rounding error of a half step may round the other way). vLLM
has no dynamic per-tensor form (its int8 scheme refuses one, its FP8 scheme runs it per token), so
dynamic per-tensor inputs are refused. The ``compressed-tensors`` package's own CPU forward (what
transformers runs) is a simulation that differs in two ways no config field changes: its dynamic int8
scale is ``max|x| / 127.5`` (``calculate_qparams``: half of the 255-level range; the largest value then
clamps to 127), and it multiplies the dequantized operands in float32 (``bench/ct_activation_probe.py``
measures both).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from lowbit.act_scheme import ActFormat, ActScheme
from lowbit.formats import FormatName, pack
from lowbit.io.export.base import Exporter, Feature
from lowbit.io.export.hf_quantized import (HFQuantizedExport, check_schemes, float_linears, quantized_state,
                                           write_hf_quantized)
from lowbit.nn import QuantLinear, quantized_layers
from lowbit.nn.act_linear import ActQuantLinear
from lowbit.nn.int8_linear import Int8OutlierLinear
from lowbit.scheme import Granularity, QuantScheme, ZeroPoint

if TYPE_CHECKING:
    from lowbit.pipeline.recipe import Recipe

CT_VERSION = "0.19.0"  # the compressed-tensors release whose layout this writes (and whose package verified it)


def ct_mismatch(scheme: QuantScheme) -> str | None:
    """None when compressed-tensors stores ``scheme`` exactly, else why not (one clause)."""
    if scheme.format not in (FormatName.INT, FormatName.FP8_E4M3):
        return f"compressed-tensors stores integer or FP8 E4M3 weights here, not {scheme.format.value}"
    if scheme.double_quant or scheme.super_group is not None:
        return "its scales are plain floats, not 8-bit or two-level codes"
    if not scheme.symmetric and scheme.zero_point is ZeroPoint.FLOAT:
        return "its zero-points are integers on the code grid, not float minimums"
    if scheme.group_index:
        return "its act-order keeps groups in a permuted column order lowbit's g_idx does not record"
    if scheme.sparse:
        return "it has no sparse outlier part"
    if scheme.format is FormatName.FP8_E4M3 and scheme.granularity is Granularity.GROUP:
        return "its FP8 weights have per-channel or per-tensor scales (block FP8 is another layout)"
    return None


def _format(layer: QuantLinear) -> str:
    if layer.scheme.format is FormatName.FP8_E4M3:
        return "float-quantized"
    return "int-quantized" if isinstance(layer, ActQuantLinear) else "pack-quantized"


def _weights_args(scheme: QuantScheme) -> dict[str, Any]:
    fp8 = scheme.format is FormatName.FP8_E4M3
    strategy = {Granularity.TENSOR: "tensor", Granularity.CHANNEL: "channel", Granularity.GROUP: "group"}
    return {"num_bits": scheme.bits, "type": "float" if fp8 else "int", "symmetric": scheme.symmetric,
            "strategy": strategy[scheme.granularity], "group_size": scheme.group_size, "dynamic": False,
            "actorder": None, "observer": "minmax", "block_structure": None}


def _input_args(act: ActScheme | None) -> dict[str, Any] | None:
    if act is None:
        return None
    return {"num_bits": 8, "type": "float" if act.format is ActFormat.FP8_E4M3 else "int", "symmetric": True,
            "strategy": act.granularity if act.dynamic else "tensor", "dynamic": act.dynamic, "group_size": None,
            "actorder": None, "observer": None if act.dynamic else "minmax", "block_structure": None}


def ct_tensors(layer: QuantLinear, scale_dtype: torch.dtype, name: str = "layer") -> dict[str, Tensor]:
    """The tensors of one quantized linear in its compressed-tensors format (module docstring)."""
    qw = layer.quantized_weight()
    scheme, (out_features, in_features) = qw.scheme, qw.shape
    scale = qw.scales().to(scale_dtype)
    fmt = _format(layer)
    if fmt == "pack-quantized":
        if in_features * scheme.bits % 32 or (not scheme.symmetric and out_features * scheme.bits % 32):
            raise ValueError(f"{name}: {in_features} x {out_features} codes of {scheme.bits} bits do not fill "
                             "whole 32-bit words of compressed-tensors' packing")
        tensors = {"weight_packed": pack(qw.codes(), scheme.bits).view(torch.int32),
                   "weight_scale": scale, "weight_shape": torch.tensor([out_features, in_features])}
        if not scheme.symmetric:
            zeros = qw.zeros().to(torch.uint8).t().contiguous()  # [G, out]: packed along the output dimension
            tensors["weight_zero_point"] = pack(zeros, scheme.bits).view(torch.int32).t().contiguous()
    elif fmt == "int-quantized":
        tensors = {"weight": (qw.codes() ^ 0x80).view(torch.int8), "weight_scale": scale}
    else:
        tensors = {"weight": qw.codes().view(torch.float8_e4m3fn),
                   "weight_scale": scale.reshape(-1) if scheme.granularity is Granularity.TENSOR else scale}
    if isinstance(layer, ActQuantLinear) and not layer.act.dynamic:
        tensors["input_scale"] = layer.input_scale.reshape(1).to(scale_dtype)
    return tensors


def _check_layers(model: nn.Module) -> None:
    """Refuse what compressed-tensors cannot hold; everything else maps exactly."""
    check_schemes(model, ct_mismatch, "compressed-tensors")
    for name, layer in quantized_layers(model).items():
        if isinstance(layer, Int8OutlierLinear):
            raise ValueError(f"compressed-tensors cannot store layer {name}: LLM.int8's float outlier columns "
                             "have no compressed-tensors form; quantize with --acts int8 instead")
        if isinstance(layer, ActQuantLinear):
            if layer.scheme.bits != 8 or layer.scheme.granularity is not Granularity.CHANNEL:
                raise ValueError(f"compressed-tensors cannot store layer {name}: its W8A8 formats take 8-bit "
                                 f"per-channel weights, not {layer.scheme.describe()}")
            if layer.act.dynamic and layer.act.granularity != "token":
                raise ValueError(f"compressed-tensors cannot store layer {name}'s {layer.act.describe()} inputs as "
                                 "vLLM runs them (dynamic inputs are per token there); quantize with "
                                 "--act-granularity token or --act-mode static")
            if layer.act.outlier_ratio is not None:
                raise ValueError(f"compressed-tensors cannot store layer {name}: a static scheme whose layers "
                                 "may fall back to dynamic scales (--act-outlier-ratio) is two schemes")


def ct_config(model: nn.Module) -> dict[str, Any]:
    """The ``quantization_config``: one config group per distinct (scheme, activation scheme, format),
    targeting ``Linear`` when it is the only group, else its layers by name; float linears ignored."""
    groups: dict[tuple, list[str]] = {}
    for name, layer in quantized_layers(model).items():
        act = layer.act if isinstance(layer, ActQuantLinear) else None
        groups.setdefault((layer.scheme, act, _format(layer)), []).append(name)
    config_groups = {}
    for i, ((scheme, act, fmt), names) in enumerate(groups.items()):
        config_groups[f"group_{i}"] = {"targets": ["Linear"] if len(groups) == 1 else names,
                                       "weights": _weights_args(scheme), "input_activations": _input_args(act),
                                       "output_activations": None, "format": fmt}
    formats = {fmt for _, _, fmt in groups}
    return {"quant_method": "compressed-tensors", "format": formats.pop() if len(formats) == 1 else "mixed-precision",
            "quantization_status": "compressed", "config_groups": config_groups, "ignore": float_linears(model),
            "kv_cache_scheme": None, "global_compression_ratio": None, "version": CT_VERSION}


def write_compressed_tensors(model: nn.Module, tokenizer: Any, path, *, statistics: Any = None,
                             recipe: Recipe | None = None, provenance: dict[str, Any] | None = None
                             ) -> HFQuantizedExport:
    """Write a compressed-tensors directory of ``model``. Raises ``ValueError`` naming the first layer it
    cannot store, before anything is written."""
    _check_layers(model)
    scale_dtype = next((p.dtype for p in model.parameters() if p.dtype.is_floating_point), torch.float32)
    state = quantized_state(model, lambda name, layer: ct_tensors(layer, scale_dtype, name))
    config = ct_config(model)
    schemes = sorted({m.scheme.describe() for m in quantized_layers(model).values()})
    acts = {m.act for m in quantized_layers(model).values() if isinstance(m, ActQuantLinear)}
    label = ", ".join(schemes) + (" W8A8" if acts else "")
    card_recipe = None if recipe is None else {"recipe": recipe.to_dict(), **({"calibration": provenance}
                                                                              if provenance else {})}
    return write_hf_quantized(model, tokenizer, path, format_name="compressed-tensors", state=state,
                              quantization_config=config, card_format=f"compressed-tensors {label}",
                              recipe=card_recipe, tags=("compressed-tensors",))


COMPRESSED_TENSORS = Exporter(
    name="compressed-tensors",
    writes="directory",
    help="a compressed-tensors directory (int2-8 packed, W8A8 int8, FP8) that vLLM and transformers load",
    write=write_compressed_tensors,
    lossless=ct_mismatch,
    cannot_write={
        Feature.ONLINE_ROTATION: "its loaders have no place to rotate a layer's input; quantize without --rotate",
        Feature.NO_QUANTIZED_LAYERS: "it stores quantized linears; quantize the model first (lowbit quantize)",
        Feature.QUANTIZED_EMBEDDING: "lowbit writes decoder linears only; quantize with lm_head skipped (the default)",
    },
    requantizes=False,
    records_recipe=True,
)

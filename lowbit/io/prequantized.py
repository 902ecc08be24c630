"""Models someone already quantized, read as lowbit quantized layers without a float detour.

A Hugging Face directory whose ``config.json`` has a ``quantization_config`` of GPTQ (v1 or GPTQModel's
``gptq_v2``), AWQ (GEMM), compressed-tensors (``pack-quantized``, ``int-quantized`` W8A8,
``float-quantized`` FP8) or bitsandbytes (4-bit NF4/FP4, double quantization, LLM.int8) becomes the
architecture's model with a ``QuantLinear`` (or W8A8 ``ActQuantLinear``) for every packed layer, holding
the file's codes, scales and zero-points as they are (``lowbit.io.gptq_layout``,
``lowbit.io.export.compressed_tensors``' layouts read backwards; ``lowbit.io.bnb_layout`` says which
bitsandbytes layers map exactly, the others are dequantized and named in one warning); every
other tensor loads as float. So ``lowbit.load``, ``eval`` and ``export`` take such a directory, and
exporting it back to its own format writes the same codes.

A missing, extra or misshapen tensor, or a config naming a format lowbit does not read, is refused in one
line naming the file and the layer.
"""

from __future__ import annotations

import dataclasses

import json
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor, nn

from lowbit.act_scheme import ActFormat, ActScheme
from lowbit.formats import FormatName, pack, unpack
from lowbit.io.bnb_layout import bnb_weight, is_bnb_layer
from lowbit.io.config_json import CONFIG_NAME, read_config_json
from lowbit.io.gptq_layout import awq_weight, gptq_weight
from lowbit.io.tokenizer_files import load_tokenizer
from lowbit.nn import QuantLinear, set_submodule
from lowbit.nn.act_linear import ActQuantLinear
from lowbit.qweight import QuantizedWeight
from lowbit.scheme import Granularity, QuantScheme

READERS = ("gptq", "awq", "compressed-tensors", "bitsandbytes")


def prequantized_method(path: str | Path) -> str | None:
    """The ``quant_method`` of a Hugging Face directory lowbit reads as quantized weights, else None."""
    if not (Path(path) / CONFIG_NAME).is_file():
        return None
    qc = read_config_json(path).get("quantization_config")
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    return method if method in READERS else None


def prequantized_source(source: str | Path) -> bool:
    """Whether ``lowbit.load`` reads ``source`` as codes someone else quantized: a GPTQ, AWQ,
    compressed-tensors or bitsandbytes directory, or a ``.gguf`` file."""
    path = Path(source)
    return (path.is_file() and path.suffix == ".gguf") or (path.is_dir() and prequantized_method(path) is not None)


def _tensors(path: Path) -> dict[str, Tensor]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path}: no .safetensors weights (a pre-quantized directory is read from safetensors only)")
    state: dict[str, Tensor] = {}
    for f in files:
        with safe_open(str(f), "pt") as handle:
            for key in handle.keys():
                state[key] = handle.get_tensor(key)
    return state


def _take(state: dict[str, Tensor], name: str, fields: tuple[str, ...]) -> dict[str, Tensor]:
    return {f: state.pop(f"{name}.{f}") for f in fields if f"{name}.{f}" in state}


def _gptq_layer(qc: dict[str, Any], name: str, tensors: dict[str, Tensor], shape: tuple[int, int]) -> QuantizedWeight:
    bits, group, sym = qc.get("bits", 4), qc.get("group_size", 128), qc.get("sym", True)
    for pattern, override in (qc.get("dynamic") or {}).items():
        if pattern.startswith("+:") or not pattern.startswith("-:"):
            if re.match(pattern.removeprefix("+:"), name):
                bits, group = override.get("bits", bits), override.get("group_size", group)
    v2 = qc.get("checkpoint_format") == "gptq_v2"
    return gptq_weight(tensors, bits, group, sym, shape, name, v2=v2)


def _ct_layer(group: dict[str, Any], name: str, tensors: dict[str, Tensor],
              shape: tuple[int, int]) -> tuple[QuantizedWeight, ActScheme | None, Tensor | None]:
    """A compressed-tensors layer's weight, activation scheme and static input scale."""
    w, fmt = group["weights"], group.get("format")
    out_features, in_features = shape
    strategy = w.get("strategy")
    granularity = {"tensor": Granularity.TENSOR, "channel": Granularity.CHANNEL, "group": Granularity.GROUP}.get(strategy)
    if granularity is None or w.get("actorder") not in (None, "static"):
        raise ValueError(f"{name}: compressed-tensors weight strategy {strategy!r} / actorder {w.get('actorder')!r} "
                         "has no lowbit scheme")
    fp8 = w.get("type") == "float"
    scheme = QuantScheme(format=FormatName.FP8_E4M3 if fp8 else FormatName.INT, bits=w["num_bits"],
                         granularity=granularity, group_size=w.get("group_size"), symmetric=w.get("symmetric", True))
    if "weight_scale" not in tensors:
        raise ValueError(f"{name}: tensor 'weight_scale' is missing")
    R, G = (1, 1) if granularity is Granularity.TENSOR else (out_features, in_features // scheme.group_length(in_features, name))
    scale = tensors["weight_scale"].float().reshape(R, G)
    if not torch.equal(scale.half().float(), scale):  # float32 scales (llm-compressor's default) kept exactly
        scheme = dataclasses.replace(scheme, float32_scales=True)
    data: dict[str, Tensor] = {"scale": scale if scheme.float32_scales else scale.half()}
    if fmt == "pack-quantized":
        if "weight_packed" not in tensors:
            raise ValueError(f"{name}: tensor 'weight_packed' is missing")
        codes = unpack(tensors["weight_packed"].contiguous().view(torch.uint8), scheme.bits, in_features)
        if not scheme.symmetric:
            if "weight_zero_point" not in tensors:
                raise ValueError(f"{name}: tensor 'weight_zero_point' of an asymmetric scheme is missing")
            zp = tensors["weight_zero_point"].t().contiguous().view(torch.uint8)
            data["zero"] = pack(unpack(zp, scheme.bits, out_features).t().contiguous(), scheme.bits)
    elif fmt in ("int-quantized", "float-quantized", "naive-quantized"):
        weight = tensors.get("weight")
        if weight is None:
            raise ValueError(f"{name}: tensor 'weight' is missing")
        codes = weight.view(torch.uint8) ^ (0 if fp8 else 0x80)
        if not scheme.symmetric:
            raise ValueError(f"{name}: asymmetric {fmt} weights have no lowbit scheme")
    else:
        raise ValueError(f"{name}: compressed-tensors format {fmt!r} is not one lowbit reads "
                         "(pack-quantized, int-quantized, float-quantized)")
    data["qdata"] = pack(codes.contiguous(), scheme.bits)
    qw = QuantizedWeight.from_tensors(scheme, shape, data)
    a = group.get("input_activations")
    if not a:
        return qw, None, None
    if a.get("num_bits", 8) != 8 or not a.get("symmetric", True):
        raise ValueError(f"{name}: compressed-tensors input activations of {a.get('num_bits', 8)} bits, "
                         f"{'symmetric' if a.get('symmetric', True) else 'asymmetric (input_zero_point)'}, have no "
                         "lowbit activation scheme (8-bit symmetric only); dequantize the model with its own tool")
    act = ActScheme(format=ActFormat.FP8_E4M3 if a.get("type") == "float" else ActFormat.INT8,
                    dynamic=bool(a.get("dynamic")), granularity=a.get("strategy") or "tensor")
    return qw, act, tensors.get("input_scale")


def _ct_group_of(qc: dict[str, Any], name: str, module: nn.Module) -> dict[str, Any] | None:
    for group in qc.get("config_groups", {}).values():
        for target in group.get("targets", []):
            if target == type(module).__name__ or target == name or (
                    target.startswith("re:") and re.match(target[3:], name)):
                return group
    return None


def load_prequantized(path: str | Path) -> tuple[nn.Module, Any]:
    """(model, tokenizer) of a GPTQ, AWQ, compressed-tensors or bitsandbytes directory, quantized layers as
    lowbit layers (a bitsandbytes layer whose codes do not map keeps a float weight: one warning lists them).

    Raises:
        ValueError: not such a directory, or a tensor missing, extra or of the wrong shape (one line).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    method = prequantized_method(path)
    if method is None:
        raise ValueError(f"{path}: no GPTQ, AWQ, compressed-tensors or bitsandbytes quantization_config in "
                         f"{CONFIG_NAME}")
    config_dict = json.loads((path / CONFIG_NAME).read_text())
    qc = config_dict.pop("quantization_config")
    config = AutoConfig.for_model(**config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, str(config_dict.get("dtype") or "float32")))
    state = _tensors(path)
    replaced: set[str] = set()
    notes: list[tuple[str, str]] = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        shape = (module.out_features, module.in_features)
        if method in ("gptq", "awq") and f"{name}.qweight" in state:
            tensors = _take(state, name, ("qweight", "qzeros", "scales", "g_idx"))
            qw = (_gptq_layer(qc, name, tensors, shape) if method == "gptq"
                  else awq_weight(tensors, qc.get("group_size", 128), shape, name))
            act = input_scale = None
        elif method == "compressed-tensors" and (f"{name}.weight_scale" in state or f"{name}.weight_packed" in state):
            group = _ct_group_of(qc, name, module)
            if group is None or name in qc.get("ignore", []):
                raise ValueError(f"{path}: layer {name} holds quantized tensors but no config group targets it")
            tensors = _take(state, name, ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape",
                                          "weight", "input_scale"))
            qw, act, input_scale = _ct_layer(group, name, tensors, shape)
        elif method == "bitsandbytes" and is_bnb_layer(set(state), name):
            tensors = {k[len(name) + 1:]: state.pop(k) for k in list(state)
                       if k.startswith(name + ".") and k != name + ".bias"}
            qw, note = bnb_weight(tensors, shape, name)
            act = input_scale = None
            if note:
                notes.append((name, note))
            if not isinstance(qw, QuantizedWeight):  # codes that do not map: the float weight bitsandbytes computes
                state[f"{name}.weight"] = qw.to(module.weight.dtype)
                continue
        else:
            continue
        bias = state.pop(f"{name}.bias", None)
        layer = QuantLinear.from_quantized(qw, bias)
        if act is not None:
            scale = None if act.dynamic else float(input_scale.reshape(-1)[0]) if input_scale is not None else None
            layer = ActQuantLinear.from_quant_linear(layer, act, scale, layer=name)
        set_submodule(model, name, layer)
        replaced.add(name)
    model.tie_weights()
    result = model.load_state_dict(state, strict=False)
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    missing = [k for k in result.missing_keys if k not in tied and k.rpartition(".")[0] not in replaced]
    if missing or result.unexpected_keys:
        raise ValueError(f"{path}: the weights do not match the {method} model: missing {missing[:3]}, "
                         f"unexpected {result.unexpected_keys[:3]}")
    model.tie_weights()
    if notes:
        by_reason: dict[str, list[str]] = {}
        for name, note in notes:
            by_reason.setdefault(note, []).append(name)
        said = "; ".join(f"{len(names)} layers {note} (e.g. {names[0]})" for note, names in by_reason.items())
        warnings.warn(f"{path}: bitsandbytes layers not read as they are stored: {said}", stacklevel=2)
    model.config._name_or_path = str(path)
    return model.eval(), load_tokenizer(str(path), str(path))

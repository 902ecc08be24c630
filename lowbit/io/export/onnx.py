"""ONNX Runtime as an exporter: a directory with ``model.onnx`` (+ ``model.onnx.data``) that
``onnxruntime`` runs on CPU, with a KV cache, and the tokenizer.

The graph is ``lowbit.onnx.llama``'s (Llama-family models); 4-bit and 8-bit layers become ``MatMulNBits``
(8-bit groups that are no MatMulNBits block: ``DequantizeLinear`` + ``MatMul``) over lowbit's own codes and scales
(``lowbit.onnx.linear``), so every scheme it writes is lossless and the rest is refused with the
reason before anything is written. Option ``accuracy_level`` is MatMulNBits' (0, the default:
float32 products, what lowbit's evaluation computes; 4: int8 activations, faster).
``lowbit_onnx.json`` records the graph's inputs and outputs and each layer's scheme; the source
model's name and licence (when its config states one) go into the ONNX ``metadata_props``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn

from lowbit.io.export.base import Exporter, Feature, Option
from lowbit.io.output import ONNX_RECORD, staged_output
from lowbit.scheme import QuantScheme

MODEL_FILE, DATA_FILE = "model.onnx", "model.onnx.data"
RECORD_VERSION = 1  # of lowbit_onnx.json and the graph's input/output contract
ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # MatMulNBits: 0 unset (float32), 1 fp32, 2 fp16, 3 bf16, 4 int8 activations


@dataclass(frozen=True)
class OnnxExport:
    """What the ONNX exporter wrote: the directory, its layers by operator, the accuracy level, bytes."""

    path: Path
    matmulnbits_layers: int
    dequantize_linear_layers: int
    float_layers: int
    accuracy_level: int
    size_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path)}

    def summary(self) -> list[str]:
        return [f"{self.path}: ONNX ({self.matmulnbits_layers} MatMulNBits, {self.dequantize_linear_layers} "
                f"DequantizeLinear, {self.float_layers} float linears; accuracy_level {self.accuracy_level}), "
                f"{self.size_bytes / 2**20:.1f} MiB"]


def write_onnx(model: nn.Module, tokenizer: Any, path: Path, *, statistics: Any = None,
               accuracy_level: int | str = 0) -> OnnxExport:
    """Build the whole graph in memory (so a refusal leaves nothing behind), then write
    ``model.onnx``, its external data, the tokenizer and ``lowbit_onnx.json`` into a staged directory
    renamed to ``path``.

    Raises:
        ValueError: an architecture ``lowbit.onnx.llama`` does not map, or a layer whose scheme or
            module has no ONNX Runtime operator (naming the layer and why).
    """
    import onnx

    from lowbit.onnx.llama import build_llama, io_names, unsupported

    level = _accuracy_level(accuracy_level)
    reason = unsupported(model)
    if reason is not None:
        raise ValueError(f"onnx export maps Llama-family models only: {reason}")
    schemes = _layer_schemes(model)
    proto = build_llama(model, level, _metadata(model, level))
    inputs, outputs = io_names(model.config.num_hidden_layers)
    kv_heads, head_dim = cache_dims(model)
    record = {"format": "onnx", "version": RECORD_VERSION, "inputs": inputs, "outputs": outputs,
              "accuracy_level": level,
              "layers": {name: "float" if s is None else s.describe() for name, s in schemes.items()},
              "num_key_value_heads": kv_heads, "head_dim": head_dim}
    with staged_output(path, overwrite=True, directory=True) as tmp:
        onnx.save_model(proto, str(tmp / MODEL_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=DATA_FILE, size_threshold=1024)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        (tmp / ONNX_RECORD).write_text(json.dumps(record, indent=1) + "\n")
    size = sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())
    operators = [node.op_type for node in proto.graph.node]
    return OnnxExport(Path(path), operators.count("MatMulNBits"), operators.count("DequantizeLinear"),
                      sum(s is None for s in schemes.values()), level, size)


def cache_dims(model: nn.Module) -> tuple[int, int]:
    """(KV heads, head dim) of ``model``'s attention, which the cache tensors have."""
    config = model.config
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return kv, getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _layer_schemes(model: nn.Module) -> dict[str, QuantScheme | None]:
    """Every linear's scheme (None: float), after refusing one that has no ONNX Runtime operator."""
    from lowbit.nn import QuantLinear
    from lowbit.onnx.schemes import check_nbits_block, onnx_mismatch

    schemes: dict[str, QuantScheme | None] = {}
    for name, module in model.named_modules():
        if type(module) is QuantLinear:
            why = onnx_mismatch(module.scheme)
            if why is None:
                try:
                    check_nbits_block(module.scheme, module.in_features)
                except ValueError as e:
                    why = str(e)
            if why is not None:
                raise ValueError(f"onnx cannot write {name} ({module.scheme.describe()}): {why}")
            schemes[name] = module.scheme
        elif isinstance(module, QuantLinear):
            raise ValueError(f"onnx cannot write {name}: a {type(module).__name__} quantizes its activations, which "
                             "the exported graph does not (export the weight-only model)")
        elif type(module) is nn.Linear:
            schemes[name] = None
    return schemes


def _metadata(model: nn.Module, level: int) -> dict[str, str]:
    """``metadata_props``: where the weights came from and under which licence, when the config says.
    (The model card writer, ``lowbit.io.model_card``, reads the same keys.)"""
    config = model.config
    meta = {"producer": "lowbit", "accuracy_level": str(level), "architecture": config.model_type}
    source = getattr(config, "_name_or_path", "") or getattr(config, "name_or_path", "")
    if source:
        meta["source_model"] = str(source)
    licence = getattr(config, "license", None)
    if licence:
        meta["license"] = str(licence)
    return meta


def _accuracy_level(value: int | str) -> int:
    try:
        level = int(value)
    except (TypeError, ValueError):
        level = -1
    if level not in ACCURACY_LEVELS:
        raise ValueError(f"accuracy_level must be one of {', '.join(map(str, ACCURACY_LEVELS))}, got {value!r} "
                         "(0: float32 products, 4: int8 activations)")
    return level


def _lossless(scheme: QuantScheme) -> str | None:
    from lowbit.onnx.schemes import onnx_mismatch

    return onnx_mismatch(scheme)


def _check_options(options: Mapping[str, Any]) -> None:
    if options.get("accuracy_level") is not None:
        _accuracy_level(options["accuracy_level"])


ONNX = Exporter(
    name="onnx",
    writes="directory",
    help="an ONNX Runtime model with a KV cache (MatMulNBits over lowbit's 4-bit and 8-bit codes)",
    write=write_onnx,
    lossless=_lossless,
    cannot_write={Feature.ONLINE_ROTATION: "the exported graph has no Hadamard rotation of linear inputs; "
                                           "quantize without --rotate to export ONNX"},
    options=(Option("accuracy_level", "MatMulNBits accuracy_level: 0 (default, float32 products) ... "
                                      "4 (int8 activations, faster)"),),
    check_options=_check_options,
)

"""What the GPTQ, AWQ and compressed-tensors exporters share: a Hugging Face directory whose quantized
linears are stored in another tool's layout.

The directory holds ``model.safetensors`` (every float tensor of the model as it is, each quantized
linear's lowbit buffers replaced by the format's tensors under the same layer name), ``config.json``
with the format's ``quantization_config``, the tokenizer, a README model card with the source's
licence (``lowbit.io.model_card``) and ``lowbit_export.json`` (the format and each layer's lowbit
scheme, which marks the directory as lowbit's so ``--overwrite`` may replace it). Everything is
computed before the first byte is written, so a layer the format cannot hold fails with one line and
no output; the directory is built beside its place and renamed in (``lowbit.io.output``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import Tensor, nn

from lowbit.evaluate.size import size_report
from lowbit.io.model_card import ModelCard, model_origin, write_model_card
from lowbit.io.output import EXPORT_RECORD, staged_output
from lowbit.nn import QuantLinear, quantized_layers
from lowbit.scheme import QuantScheme

WEIGHTS_NAME = "model.safetensors"
LayerTensors = Callable[[str, QuantLinear], dict[str, Tensor]]


@dataclass(frozen=True)
class HFQuantizedExport:
    """What was written: the directory, its format, quantized layers, lowbit's exact bits per weight and
    the bytes of the weights file."""

    path: Path
    format: str
    quantized_layers: int
    bpw: float
    size_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path)}

    def summary(self) -> list[str]:
        return [f"{self.path}: {self.format} directory, {self.quantized_layers} quantized layers, "
                f"{self.bpw:.4f} bits/weight, {self.size_bytes / 2**20:.1f} MiB"]


def check_schemes(model: nn.Module, mismatch: Callable[[QuantScheme], str | None], format_name: str) -> None:
    """Refuse, in one line naming the first such layer, a quantized layer whose scheme ``format_name``
    cannot store (``mismatch`` says why)."""
    for name, layer in quantized_layers(model).items():
        why = mismatch(layer.scheme)
        if why is not None:
            raise ValueError(f"{format_name} cannot store layer {name} ({layer.scheme.describe()}): {why}; "
                             f"re-quantize with a scheme it has, or export --to lowbit/gguf")


def float_linears(model: nn.Module) -> list[str]:
    """Names of the ``nn.Linear`` layers left in float (lm_head, skipped layers)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not isinstance(m, QuantLinear)]


def quantized_state(model: nn.Module, layer_tensors: LayerTensors) -> dict[str, Tensor]:
    """The model's tensors by name, tied ones once, with each quantized layer's lowbit buffers replaced by
    ``layer_tensors(name, layer)`` (its bias kept as ``name.bias``)."""
    layers = quantized_layers(model)
    state: dict[str, Tensor] = {}
    seen: set[int] = set()
    for key, tensor in model.state_dict(keep_vars=False).items():
        owner = key.rpartition(".")[0]
        if owner in layers and not key.endswith(".bias"):
            continue
        if id(tensor) in seen or tensor.untyped_storage().data_ptr() in seen:
            continue  # a tied alias (the LM head of a tied embedding)
        seen.add(tensor.untyped_storage().data_ptr())
        state[key] = tensor.detach().contiguous()
    for name, layer in layers.items():
        for field, tensor in layer_tensors(name, layer).items():
            state[f"{name}.{field}"] = tensor.contiguous()
    return dict(sorted(state.items()))


def write_hf_quantized(model: nn.Module, tokenizer: Any, path: Path, *, format_name: str,
                       state: Mapping[str, Tensor], quantization_config: dict[str, Any],
                       extra_json: Mapping[str, dict[str, Any]] | None = None, card_format: str,
                       recipe: Mapping[str, Any] | None = None, tags: tuple[str, ...] = ()) -> HFQuantizedExport:
    """Write the directory (see the module docstring); ``extra_json`` adds files such as GPTQ's
    ``quantize_config.json``. Returns what was written."""
    config = model.config.to_dict()
    config["quantization_config"] = quantization_config
    record = {"format": format_name, "version": 1,
              "layers": {n: m.scheme.to_dict() for n, m in quantized_layers(model).items()}}
    size = size_report(model)
    with staged_output(path, overwrite=True, directory=True) as tmp:
        # one metadata key only: safetensors writes metadata in hash order (byte-identical outputs)
        save_file(dict(state), tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for name, content in (extra_json or {}).items():
            (tmp / name).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
        (tmp / EXPORT_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        weights_bytes = (tmp / WEIGHTS_NAME).stat().st_size
        measured = {"bits_per_weight": round(size.bpw, 4), "weights_file_bytes": weights_bytes}
        write_model_card(tmp, ModelCard(model_origin(model), card_format, recipe=recipe, measured=measured,
                                        tags=("quantized", *tags)))
    return HFQuantizedExport(path, format_name, size.quantized_layers, size.bpw, weights_bytes)


def one_scheme(model: nn.Module) -> QuantScheme:
    """The scheme most quantized layers share (the format's default; the others become overrides)."""
    counts: dict[QuantScheme, int] = {}
    for layer in quantized_layers(model).values():
        counts[layer.scheme] = counts.get(layer.scheme, 0) + 1
    return max(counts, key=lambda s: (counts[s], s.describe()))


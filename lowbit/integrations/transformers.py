"""transformers' quantizer hooks for ``LowbitConfig`` (``quant_method: "lowbit"``).

Registered when ``lowbit`` is imported. Two ways in:

- float checkpoint + ``LowbitConfig(load_in_4bit=True)`` or ``load_in_8bit=True``: the loader hands
  each selected linear's weight to ``LowbitQuantize`` as it is read; the op quantizes it and puts
  the quantized module in place, so only one float weight is alive at a time.
- quantized checkpoint (``layers`` in its config): the listed layers become empty quantized modules
  before loading and the loader fills their buffers by name, with no float weights at all.

A quantized checkpoint is checked against its manifest (``lowbit.io.manifest``) before anything
is built; one that differs is refused, a format-1 checkpoint loads with a warning. There is no
opt-out here: transformers ignores a ``quantization_config`` passed for a quantized checkpoint, and
a switch in ``config.json`` would let an edit turn the check off; ``lowbit.load(path,
verify=False)`` loads a checkpoint changed on purpose.

After loading, the config's ``layers`` describe every quantized module, and the model's
``save_pretrained`` writes a lowbit checkpoint of the current format: built beside its place, sealed
with the manifest and renamed in (``lowbit.io.output``), so it loads again the second way.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.core_model_loading import ConversionOps
from transformers.quantizers import (
    HfQuantizer,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.quantizers_utils import should_convert_module

from lowbit.config import LowbitConfig
from lowbit.io.checkpoint import FORMAT_VERSION, QUANT_METHOD, read_quantization_config
from lowbit.io.manifest import write_manifest
from lowbit.io.output import staged_output
from lowbit.memory import return_freed_heap
from lowbit.methods.rtn import quantize_rtn
from lowbit.nn import QuantLinear, quantized_layers, set_submodule
from lowbit.nn.int8_linear import INT8_WEIGHT, Int8OutlierLinear
from lowbit.nn.records import LayerRecord, install_layer, layer_records


class LowbitHfQuantizer(HfQuantizer):
    """Quantizes on load (``load_in_4bit``/``load_in_8bit``) or loads lowbit's quantized layers."""

    requires_calibration = False
    quantization_config: LowbitConfig

    def __init__(self, quantization_config: LowbitConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self.targets: set[str] = set()

    @property
    def quantized_element_size(self) -> float:
        return 1.0 if self.quantization_config.load_in_8bit else 0.5

    def param_needs_quantization(self, model: nn.Module, param_name: str, **kwargs: Any) -> bool:
        module_name, _, tensor_name = param_name.rpartition(".")
        return not self.pre_quantized and tensor_name == "weight" and module_name in self.targets

    def _process_model_before_weight_loading(self, model: nn.Module, checkpoint_files: list[str] | None = None,
                                             **kwargs: Any) -> None:
        config = self.quantization_config
        if self.pre_quantized:
            if checkpoint_files:  # verified before anything is built; raises on a difference
                read_quantization_config(Path(checkpoint_files[0]).parent)
            for name, entry in config.layers.items():
                linear = model.get_submodule(name)
                if [linear.out_features, linear.in_features] != entry["shape"]:
                    raise ValueError(f"layer {name} is {entry['shape']} in quantization_config but "
                                     f"{[linear.out_features, linear.in_features]} in the model config")
                with torch.device("meta"):
                    module = install_layer(model, name, LayerRecord.from_entry(entry), linear.bias is not None)
                module.compute_dtype = config.torch_compute_dtype()
            return
        skip = self.get_modules_to_not_convert(model, config.skip_modules, model._keep_in_fp32_modules)
        self.targets = {name for name, m in model.named_modules()
                        if isinstance(m, nn.Linear) and should_convert_module(name, skip)}
        if not self.targets:
            raise ValueError(f"LowbitConfig selects none of the model's linear layers (skip_modules={skip})")
        if config.load_in_4bit:
            for name in sorted(self.targets):  # a block size that does not fit fails before any loading
                in_features = model.get_submodule(name).in_features
                if in_features % config.block_size:
                    fits = [b for b in (32, 64, 128, 256) if in_features % b == 0]
                    raise ValueError(f"block_size={config.block_size} does not divide in_features={in_features} of "
                                     f"{name}; use block_size in {fits} or add the layer to skip_modules")

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        layers = quantized_layers(model)
        config = self.quantization_config
        # the config now describes the model in memory, which a save writes in the current format
        config.layers = {name: r.to_entry() for name, r in layer_records(model).items()}
        config.version, config.manifest, config.sha256 = FORMAT_VERSION, None, None
        if not self.pre_quantized:
            _release_checkpoint_mapping(model, layers.values())
        _save_as_lowbit_checkpoint(model)
        return model

    def get_quantize_ops(self) -> ConversionOps:
        return LowbitQuantize(self)

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True  # LoRA adapters train on top (lowbit.train.qlora)


class LowbitQuantize(ConversionOps):
    """Quantize one linear's float weight as it loads and swap the quantized module in."""

    def __init__(self, hf_quantizer: LowbitHfQuantizer) -> None:
        self.hf_quantizer = hf_quantizer

    @torch.no_grad()
    def convert(self, input_dict: dict[str, Any], model: nn.Module | None = None, full_layer_name: str | None = None,
                missing_keys: set[str] | None = None, **kwargs: Any) -> dict[str, torch.Tensor]:
        config = self.hf_quantizer.quantization_config
        value = next(iter(input_dict.values()))
        weight = (value[0] if isinstance(value, list) else value).float()
        name = full_layer_name.rpartition(".")[0]
        linear = model.get_submodule(name)
        if config.load_in_8bit:
            quantized = QuantLinear.from_quantized(quantize_rtn(weight, INT8_WEIGHT, layer=name))
            module = Int8OutlierLinear.from_quant_linear(quantized, config.int8_threshold, layer=name)
        else:
            module = QuantLinear.from_quantized(quantize_rtn(weight, config.weight_scheme(), layer=name))
        module.compute_dtype = config.torch_compute_dtype()
        if linear.bias is not None:  # loaded already, or still on meta and filled by name later
            module.bias = linear.bias
        set_submodule(model, name, module)
        if missing_keys is not None:
            missing_keys.discard(full_layer_name)
        return {}


def _save_as_lowbit_checkpoint(model: nn.Module) -> None:
    """Make ``model.save_pretrained(directory, ...)`` write through ``lowbit.io.output.staged_output``:
    transformers writes into a temporary directory beside ``directory``, the manifest is added, and
    the whole is renamed into place. As with ``--overwrite``, an existing ``directory`` is replaced
    only when it is a lowbit checkpoint (or empty). ``push_to_hub`` is refused: it would upload the
    temporary directory, without the manifest.

    transformers has no hook after its save, so the instance's method is wrapped."""
    save_pretrained = model.save_pretrained

    @functools.wraps(save_pretrained)
    def save(save_directory: str | Path, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("push_to_hub"):
            raise ValueError("save_pretrained of a lowbit model cannot push_to_hub: save it to a directory, then "
                             "upload that directory (huggingface_hub.upload_folder)")
        with staged_output(save_directory, overwrite=True, directory=True) as tmp:
            save_pretrained(tmp, *args, **kwargs)
            write_manifest(tmp)

    model.save_pretrained = save


@torch.no_grad()
def _release_checkpoint_mapping(model: nn.Module, quantized: Any) -> None:
    """Copy the tensors kept in float (embedding, norms) out of the memory-mapped float checkpoint.

    transformers maps safetensors files and its float tensors are views of the mapping; while one
    of them lives, every page of the file that quantization read stays resident (measured on
    SmolLM2: 559 MB of file-backed pages after an NF4 load, more than the fp32 model's own RSS).
    Copying the few float tensors lets the mapping go.
    """
    owned = {id(t) for m in quantized for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]}
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in owned and not tensor.is_meta:
            tensor.data = tensor.data.clone()
    return_freed_heap()


def register() -> None:
    """Make ``quant_method: "lowbit"`` known to transformers (idempotent)."""
    from transformers.quantizers.auto import (
        AUTO_QUANTIZATION_CONFIG_MAPPING,
        AUTO_QUANTIZER_MAPPING,
    )

    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(LowbitConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(LowbitHfQuantizer)

"""``LowbitConfig``: load a model quantized, with one config object (the ``BitsAndBytesConfig`` experience).

    import lowbit  # registers quant_method "lowbit" with transformers
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=lowbit.LowbitConfig(load_in_4bit=True))

Weights are quantized one tensor at a time as they load, so peak memory stays near the quantized
size. ``save_pretrained`` writes the config with every quantized layer's record (``layers``), and
plain ``from_pretrained`` loads it again after ``import lowbit``; so do checkpoints written by
``lowbit quantize``, whose ``quantization_config`` has the same ``layers`` record. Both write and
check the same manifest (``lowbit.io.manifest``); ``from_pretrained`` of a quantized checkpoint
refuses one that differs from it.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.utils.quantization_config import QuantizationConfigMixin

from lowbit.io.checkpoint import FORMAT_VERSION, LEGACY_VERSION, QUANT_METHOD
from lowbit.scheme import QuantScheme

QUANT_TYPES = ("nf4", "fp4", "int4")
_COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class LowbitConfig(QuantizationConfigMixin):
    """How ``from_pretrained`` quantizes a float checkpoint, or what a quantized checkpoint holds.

    Args:
        load_in_4bit: weights in 4 bits, ``quant_type`` codes in blocks of ``block_size`` (QLoRA).
        load_in_8bit: LLM.int8(): int8 weights per output row, int8 x int8 products with input
            columns above ``int8_threshold`` taken in float.
        quant_type: ``nf4`` (QLoRA's NormalFloat), ``fp4`` (E2M1) or ``int4`` (symmetric integer).
        double_quant: store the block scales in 8 bits (QLoRA: 4.127 instead of 4.5 bits per weight).
        block_size: weights per scale along the input dimension; must divide every quantized
            layer's ``in_features`` (64 fits the demo models' 576 and 640; 128 does not).
        compute_dtype: dtype of the dequantized product (``torch.bfloat16``, ``"float16"`` ...);
            None computes in the input's dtype.
        skip_modules: module names (or suffixes, or regexes) kept in float; ``lm_head`` by default,
            as the QLoRA paper and bitsandbytes do.
        int8_threshold: LLM.int8's outlier magnitude (6.0 in the paper).
        layers: name -> record of each quantized layer (``lowbit.nn.records``); set for a quantized
            checkpoint, in which case the flags above are not needed.
        recipe, version, manifest, calibration: the rest of a checkpoint's record; ``sha256`` is what
            a checkpoint of format 1 recorded instead of the manifest.

    Raises:
        ValueError: both or neither of ``load_in_4bit``/``load_in_8bit`` (without ``layers``), an
            unknown ``quant_type`` or ``compute_dtype``, a non-positive block size or threshold.
    """

    def __init__(self, load_in_4bit: bool = False, load_in_8bit: bool = False, quant_type: str = "nf4",
                 double_quant: bool = True, block_size: int = 64, compute_dtype: torch.dtype | str | None = None,
                 skip_modules: list[str] | None = None, int8_threshold: float = 6.0,
                 layers: dict[str, Any] | None = None, recipe: dict[str, Any] | None = None,
                 version: int = FORMAT_VERSION, manifest: dict[str, Any] | None = None,
                 sha256: dict[str, str] | None = None, calibration: dict[str, Any] | None = None,
                 quant_method: str = QUANT_METHOD) -> None:
        if quant_method != QUANT_METHOD:
            raise ValueError(f"LowbitConfig is for quant_method {QUANT_METHOD!r}, got {quant_method!r}")
        if version not in (LEGACY_VERSION, FORMAT_VERSION):
            raise ValueError(f"lowbit checkpoint format {version} is not supported "
                             f"(this lowbit reads {LEGACY_VERSION} and {FORMAT_VERSION})")
        if load_in_4bit and load_in_8bit:
            raise ValueError("load_in_4bit and load_in_8bit are exclusive; pick one")
        if not (load_in_4bit or load_in_8bit or layers):
            raise ValueError("LowbitConfig needs load_in_4bit=True or load_in_8bit=True")
        if quant_type not in QUANT_TYPES:
            raise ValueError(f"quant_type must be one of {', '.join(QUANT_TYPES)}, got {quant_type!r}")
        if not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        if not int8_threshold > 0:
            raise ValueError(f"int8_threshold must be positive, got {int8_threshold!r}")
        self.quant_method = QUANT_METHOD
        self.version = version
        self.load_in_4bit = load_in_4bit
        self.load_in_8bit = load_in_8bit
        self.quant_type = quant_type
        self.double_quant = double_quant
        self.block_size = block_size
        self.compute_dtype = _dtype_name(compute_dtype)
        self.skip_modules = ["lm_head"] if skip_modules is None else list(skip_modules)
        self.int8_threshold = float(int8_threshold)
        self.layers = layers
        self.recipe = recipe
        self.manifest = manifest
        self.sha256 = sha256
        self.calibration = calibration

    @property
    def pre_quantized(self) -> bool:
        """Whether this describes a checkpoint whose layers are already quantized."""
        return bool(self.layers)

    def weight_scheme(self) -> QuantScheme:
        """The scheme ``load_in_4bit`` quantizes each weight with."""
        fmt = "int" if self.quant_type == "int4" else self.quant_type
        return QuantScheme(format=fmt, bits=4, granularity="group", group_size=self.block_size, symmetric=True,
                           double_quant=self.double_quant)

    def torch_compute_dtype(self) -> torch.dtype | None:
        return None if self.compute_dtype is None else _COMPUTE_DTYPES[self.compute_dtype]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields. Once ``layers`` describe the quantized model, the ``load_in_*`` flags are
        left out: transformers sends any config with ``load_in_4bit: true`` to bitsandbytes."""
        out = {k: v for k, v in self.__dict__.items() if v is not None or k == "compute_dtype"}
        if self.layers:
            out.pop("load_in_4bit")
            out.pop("load_in_8bit")
        return out


def _dtype_name(dtype: torch.dtype | str | None) -> str | None:
    if dtype is None:
        return None
    name = str(dtype).removeprefix("torch.")
    if name not in _COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be one of {', '.join(_COMPUTE_DTYPES)}, got {dtype!r}")
    return name

"""Every output format lowbit writes, in one table, and the checks every one of them shares.

    EXPORTERS["gguf"].lossless(QuantScheme(bits=8, group_size=32))   # None: Q8_0 stores it exactly
    exporter = check_export("gguf", "m.gguf", overwrite=False, features=model_features(model),
                            options={"type": "Q4_K_M"})
    report = exporter.write(model, tokenizer, Path("m.gguf"), type="Q4_K_M")

A new format is a module declaring one ``Exporter`` (``base``) plus one line in ``EXPORTERS``;
``lowbit.api.export``, ``lowbit export --to NAME`` and its options follow from the entry.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from lowbit.io.export.base import Exporter, ExportResult, Feature, Option, Statistics, model_features
from lowbit.io.export.checkpoint import CHECKPOINT
from lowbit.io.export.compressed_tensors import COMPRESSED_TENSORS
from lowbit.io.export.gguf import GGUF
from lowbit.io.export.gptq import AWQ, GPTQ
from lowbit.io.export.onnx import ONNX
from lowbit.io.export.tflite import TFLITE
from lowbit.io.output import check_output
from lowbit.scheme import QuantScheme

EXPORTERS: dict[str, Exporter] = {e.name: e for e in (CHECKPOINT, GGUF, GPTQ, AWQ, COMPRESSED_TENSORS, ONNX, TFLITE)}

__all__ = ["EXPORTERS", "ExportResult", "Exporter", "Feature", "Option", "Statistics", "check_export",
           "get_exporter", "lossless_layers", "model_features", "refusal"]


def get_exporter(name: str) -> Exporter:
    """The exporter called ``name``. Raises ``ValueError`` listing the valid names."""
    if name not in EXPORTERS:
        raise ValueError(f"unknown export format {name!r}; choose one of {', '.join(EXPORTERS)}")
    return EXPORTERS[name]


def refusal(exporter: Exporter, features: Collection[Feature]) -> str | None:
    """One line saying why ``exporter`` cannot write a model with ``features``, or None when it can."""
    for feature in Feature:  # declaration order, so the message does not depend on set order
        if feature in features and feature in exporter.cannot_write:
            return f"{exporter.name} cannot write a model with {feature.value}: {exporter.cannot_write[feature]}"
    return None


def check_export(to: str, path: str | Path, *, overwrite: bool, features: Collection[Feature] = (),
                 options: Mapping[str, Any] | None = None) -> Exporter:
    """Everything that can be known before writing: the format exists, the output path is free (or
    ``overwrite`` and lowbit wrote what is there) in a writable directory, nothing in ``features`` is
    refused, the options are valid. Returns the exporter. It takes no lock: a caller about to do
    slow work first holds ``lowbit.io.output.reserve_output``.

    Raises:
        ValueError: unknown format, a refused feature or a bad option value.
        FileExistsError: ``path`` exists and ``overwrite`` is False, or it is not lowbit's.
        OutputError: the directory of ``path`` is not writable.
    """
    exporter = get_exporter(to)
    exporter.check_options(options or {})
    reason = refusal(exporter, features)
    if reason is not None:
        raise ValueError(reason)
    check_output(path, overwrite)
    return exporter


def lossless_layers(to: str, schemes: Mapping[str, QuantScheme]) -> dict[str, str | None]:
    """Layer name -> None when ``to`` stores its ``scheme`` exactly, else why it is re-encoded."""
    exporter = get_exporter(to)
    return {name: exporter.lossless(scheme) for name, scheme in schemes.items()}

"""What an exporter is: one record per output format, declared as data.

An exporter says what it writes (a file or a directory), which format-specific options it takes,
which calibration statistics those options need, whether a quantization scheme maps onto its
format without loss (and if not, why), what it cannot write at all, and how it writes.
``lowbit.io.export`` holds the table and runs the checks every exporter shares, so an entry is the
format's own knowledge only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Literal, Protocol

from torch import nn

from lowbit.nn import QuantEmbedding, QuantLinear, quantized_layers
from lowbit.nn.input_hadamard import has_input_hadamard
from lowbit.scheme import QuantScheme


class Feature(Enum):
    """Something a model may compute that a format's runtime may not; its value reads as a noun phrase."""

    ONLINE_ROTATION = "an online Hadamard rotation of linear inputs (--rotate)"
    NO_QUANTIZED_LAYERS = "no quantized layers"
    QUANTIZED_ACTIVATIONS = "quantized activations (W8A8, LLM.int8)"
    QUANTIZED_EMBEDDING = "a quantized input embedding (an LM head tied to it)"


class Statistics(Enum):
    """Calibration statistics an exporter's options ask for (``lowbit.pipeline.statistics``)."""

    NONE = "none"
    IMPORTANCE = "mean x^2 per input column"
    HESSIAN = "mean x^2 per input column and X^T X"


@dataclass(frozen=True)
class CalibrationStatistics:
    """What an exporter's ``write`` gets as ``statistics``: ``chunks``, a lazy stream of per-block
    ``{linear name: record}`` (``lowbit.pipeline.statistics.stream_input_statistics``, records with
    ``sqmean`` and ``H``), to be consumed one chunk at a time; ``tokens`` the calibration tokens."""

    chunks: Iterable[Mapping[str, Any]]
    tokens: int


@dataclass(frozen=True)
class Option:
    """A format-specific setting, passed to ``write`` as a keyword and shown by the CLI as ``--name``.

    Fields:
        name: the keyword (``"type"``); the CLI flag replaces ``_`` by ``-``.
        help: one line for ``--help``.
        switch: a flag that is on or off (default off) rather than one taking a value.
    """

    name: str
    help: str
    switch: bool = False


class ExportResult(Protocol):
    """What ``write`` returns: where the output is, its facts as JSON, and lines for a person."""

    path: Path

    def to_dict(self) -> dict[str, Any]: ...

    def summary(self) -> list[str]: ...


@dataclass(frozen=True)
class Exporter:
    """One output format.

    Fields:
        name: the ``--to`` value, e.g. ``"gguf"``.
        writes: ``"file"`` or ``"directory"``: what the output path names.
        help: one line on what the output is and what runs it.
        write: ``write(model, tokenizer, path, *, statistics, **options) -> ExportResult``; it may
            assume the shared checks passed (output free or ``--overwrite``, nothing refused), writes
            beside ``path`` and renames into place when complete, and leaves the model as it was.
        lossless: ``lossless(scheme)`` -> None when weights of ``scheme`` are stored exactly, else the
            reason they are re-encoded (one clause, no trailing period).
        cannot_write: each ``Feature`` the format cannot represent -> why (one clause); a model with
            such a feature is refused before anything is written.
        options: the format-specific settings ``write`` takes beyond the shared ones.
        statistics: ``statistics(options)`` -> which calibration statistics those options need.
        check_options: ``check_options(options)`` raises ``ValueError`` for a bad value, so a typo
            fails before a model is loaded.
        requantizes: a layer whose scheme is not lossless is re-encoded onto the format (GGUF); False: it
            is refused (GPTQ, AWQ, compressed-tensors, whose value is the stored codes).
        records_recipe: ``write`` takes the ``recipe`` (and calibration ``provenance``) a lowbit
            checkpoint records, to keep them (in the checkpoint, or the model card).
    """

    name: str
    writes: Literal["file", "directory"]
    help: str
    write: Callable[..., ExportResult]
    lossless: Callable[[QuantScheme], str | None]
    cannot_write: Mapping[Feature, str] = field(default_factory=dict)
    options: tuple[Option, ...] = ()
    statistics: Callable[[Mapping[str, Any]], Statistics] = lambda options: Statistics.NONE
    check_options: Callable[[Mapping[str, Any]], None] = lambda options: None
    requantizes: bool = True
    records_recipe: bool = False


def model_features(model: nn.Module) -> set[Feature]:
    """The ``Feature``s ``model`` has, read from its modules."""
    features = set()
    if any(has_input_hadamard(m) for m in model.modules()):
        features.add(Feature.ONLINE_ROTATION)
    layers = quantized_layers(model)
    if not layers:
        features.add(Feature.NO_QUANTIZED_LAYERS)
    if any(type(m).forward is not QuantLinear.forward for m in layers.values()):
        features.add(Feature.QUANTIZED_ACTIVATIONS)  # W8A8 and LLM.int8 layers run their own products
    if any(isinstance(m, QuantEmbedding) for m in model.modules()):
        features.add(Feature.QUANTIZED_EMBEDDING)
    return features

"""The lowbit checkpoint as an exporter: ``model.safetensors`` + ``config.json`` + tokenizer, a directory.

It stores every scheme's codes, scales and zero-points as they are, so every scheme is lossless;
it refuses only a model with nothing quantized (``save_pretrained`` writes that).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from lowbit.evaluate.size import size_report
from lowbit.io.checkpoint import save_quantized
from lowbit.io.export.base import Exporter, Feature
from lowbit.scheme import QuantScheme

if TYPE_CHECKING:  # a recipe is data handed down to be recorded; io does not build recipes
    from lowbit.pipeline.recipe import Recipe


@dataclass(frozen=True)
class CheckpointExport:
    """What the lowbit exporter wrote: the directory, its quantized layers, exact bits per weight, bytes."""

    path: Path
    quantized_layers: int
    bpw: float
    size_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path)}

    def summary(self) -> list[str]:
        return [f"{self.path}: lowbit checkpoint, {self.quantized_layers} quantized layers, {self.bpw:.4f} bits/weight, "
                f"{self.size_bytes / 2**20:.1f} MiB"]


def write_checkpoint(model: nn.Module, tokenizer: Any, path: Path, *, statistics: Any = None,
                     recipe: Recipe | None = None, provenance: dict[str, Any] | None = None,
                     allocation: dict[str, Any] | None = None) -> CheckpointExport:
    """``save_quantized`` with the recipe the model was quantized by (recorded in the checkpoint), the
    calibration ``provenance`` (text, windows, seed, knobs) and, for an automatic mixed-precision
    recipe, its ``allocation`` record. Raises ``ValueError`` without a recipe."""
    if recipe is None:
        raise ValueError("a lowbit checkpoint records the recipe the model was quantized with; pass recipe=")
    save_quantized(model, path, recipe=recipe, tokenizer=tokenizer, overwrite=True, calibration=provenance,
                   allocation=allocation)
    size = size_report(model)
    return CheckpointExport(Path(path), size.quantized_layers, size.bpw, size.size_bytes)


def _lossless(scheme: QuantScheme) -> str | None:
    return None


CHECKPOINT = Exporter(
    name="lowbit",
    writes="directory",
    help="a lowbit checkpoint (safetensors), which lowbit.load and transformers' from_pretrained read",
    write=write_checkpoint,
    lossless=_lossless,
    cannot_write={Feature.NO_QUANTIZED_LAYERS: "a lowbit checkpoint stores quantized layers; quantize the model "
                                               "first (lowbit quantize), or keep it as a Hugging Face directory"},
    records_recipe=True,
)

"""TFLite / LiteRT as an exporter: one ``.tflite`` file with int8 weights that the LiteRT interpreter runs
(``lowbit.tflite``: Google's converter, litert-torch).

Option ``seq_len``: the file's fixed input length (default 512; the graph has no KV cache). Google's
quantizer re-quantizes every weight matrix to int8 per output channel from the float weights (a
lowbit-quantized model's dequantized ones), so no scheme is stored losslessly; an online input
rotation is refused, since the float view the converter reads does not compute it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn

from lowbit.io.export.base import Exporter, Feature, Option
from lowbit.scheme import QuantScheme

DEFAULT_SEQ_LEN = 512  # the perplexity windows of the README protocol


@dataclass(frozen=True)
class TfliteExport:
    """What the TFLite exporter wrote: the file, its fixed input length, bytes."""

    path: Path
    seq_len: int
    size_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path)}

    def summary(self) -> list[str]:
        return [f"{self.path}: TFLite, int8 weights (LiteRT weight-only recipe), input [1, {self.seq_len}], "
                f"{self.size_bytes / 2**20:.1f} MiB"]


def write(model: nn.Module, tokenizer: Any, path: Path, *, statistics: Any = None,
          seq_len: int | str = DEFAULT_SEQ_LEN) -> TfliteExport:
    """``lowbit.tflite.write_tflite`` at ``seq_len``."""
    from lowbit.tflite import write_tflite

    length = _seq_len(seq_len)
    return TfliteExport(Path(path), length, write_tflite(model, Path(path), length))


def _seq_len(value: int | str) -> int:
    try:
        length = int(value)
    except (TypeError, ValueError):
        length = 0
    if length < 1:
        raise ValueError(f"seq_len must be a positive number of tokens, got {value!r}")
    return length


def _lossless(scheme: QuantScheme) -> str | None:
    return "LiteRT's weight-only recipe re-quantizes every weight to int8 per output channel (absmax / 127)"


def _check_options(options: Mapping[str, Any]) -> None:
    if options.get("seq_len") is not None:
        _seq_len(options["seq_len"])


TFLITE = Exporter(
    name="tflite",
    writes="file",
    help="one .tflite file with int8 weights for the LiteRT interpreter (Google's converter; fixed input length)",
    write=write,
    lossless=_lossless,
    cannot_write={Feature.ONLINE_ROTATION: "the converter reads the float view, which has no Hadamard rotation; "
                                           "quantize without --rotate to export TFLite"},
    options=(Option("seq_len", f"the .tflite file's fixed input length in tokens (default {DEFAULT_SEQ_LEN})"),),
    check_options=_check_options,
)

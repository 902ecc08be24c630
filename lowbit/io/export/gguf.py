"""GGUF as an exporter: one ``.gguf`` file that llama.cpp runs (the writer is ``lowbit.gguf.export``).

Options: ``type`` (F32 ... Q8_0, Q4_K_M, ...; by default the GGUF type the model's quantized layers
already are), ``imatrix`` (block scales weighted by input importance) and ``gptq`` (GPTQ onto the
block grids with calibration Hessians). A lowbit scheme maps losslessly when GGUF has a block type
with the same codes and scales (``lowbit.gguf.codes.lossless_mismatch`` says why not); an online
input rotation cannot be written at all, since llama.cpp's graph has no place to run it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from lowbit.gguf.codes import lossless_mismatch, lossless_type
from lowbit.gguf.export import ExportReport, export_gguf
from lowbit.gguf.mixes import NEEDS_IMATRIX, file_type
from lowbit.io.export.base import CalibrationStatistics, Exporter, Feature, Option, Statistics
from lowbit.nn import QuantEmbedding, quantized_layers
from lowbit.scheme import QuantScheme


def lossless_file_type(schemes: Iterable[QuantScheme]) -> str:
    """The GGUF type that stores every one of ``schemes`` exactly, e.g. ``"Q8_0"`` for int8 g32 sym.

    Raises:
        ValueError: no schemes (a float model: name a type), a scheme with no GGUF type (saying
            why), or schemes of different types.
    """
    types = {}
    for scheme in schemes:
        mapped = lossless_type(scheme)
        if mapped is None:
            raise ValueError(f"{scheme.describe()} is no GGUF type ({lossless_mismatch(scheme)}); name a type to "
                             "re-quantize for the GGUF file (export --type, quantize --gguf-type)")
        types.setdefault(mapped.name, scheme)
    if not types:
        raise ValueError("a float model has no GGUF type of its own; name one with --type (e.g. F16, Q8_0, Q4_K_M)")
    if len(types) > 1:
        raise ValueError(f"the quantized layers are of several GGUF types ({', '.join(sorted(types))}); "
                         "name one for the file with --type")
    return next(iter(types))


def lossless_tensor_types(model: nn.Module) -> dict[str, str]:
    """HF parameter name -> the GGUF type that stores each quantized layer's codes exactly (a tied LM
    head under its embedding's name: GGUF stores the tied matrix once, as ``token_embd``), so a model
    whose layers are of several types (a GGUF read as codes: Q4_K_M mixes Q4_K, Q5_0, Q6_K, Q8_0) is
    written back with each tensor in its own type.

    Raises:
        ValueError: as ``lossless_file_type``, for a float model or a scheme with no GGUF type.
    """
    layers = quantized_layers(model)
    if not layers:
        lossless_file_type([])  # raises: a float model has no GGUF type of its own
    tied = {id(m.head): name for name, m in model.named_modules() if isinstance(m, QuantEmbedding)}
    types = {}
    for name, layer in layers.items():
        scheme = layer.quantized_weight().scheme
        mapped = lossless_type(scheme)
        if mapped is None:
            lossless_file_type([scheme])  # raises, saying why
        types[tied.get(id(layer), name) + ".weight"] = mapped.name
    return types


def write_gguf(model: nn.Module, tokenizer: Any, path: Path, *, statistics: CalibrationStatistics | None = None,
               type: str | None = None, imatrix: bool = False, gptq: bool = False,
               holdout: int | str | None = None, tensor_types: Mapping[str, str] | None = None) -> ExportReport:
    """``export_gguf`` with the file type chosen (``type``; else each quantized layer in the GGUF type its
    scheme is, ``lossless_tensor_types``), the calibration ``statistics`` the options asked for, and
    per-tensor types (``tensor_types``: HF parameter name -> GGUF type, from ``lowbit.auto.allocate_gguf``)."""
    if type:
        qtype = file_type(type).name
    elif tensor_types:
        qtype = lossless_file_type(layer.quantized_weight().scheme for layer in quantized_layers(model).values())
    else:  # each quantized tensor in the type it is; the file's type and the float tensors' the commonest
        tensor_types = lossless_tensor_types(model)
        qtype = Counter(tensor_types.values()).most_common(1)[0][0]
    report = export_gguf(model, tokenizer, path, qtype, statistics=statistics.chunks if statistics else None,
                         tensor_types=tensor_types)
    report.calibration = "gptq" if gptq else "imatrix" if imatrix else None
    report.calibration_tokens = statistics.tokens if statistics else 0
    return report


def _statistics(options: Mapping[str, Any]) -> Statistics:
    if options.get("gptq"):
        return Statistics.HESSIAN
    return Statistics.IMPORTANCE if options.get("imatrix") else Statistics.NONE


def holdout_every(options: Mapping[str, Any]) -> int:
    """The ``holdout`` option as an int (0: none). Raises ``ValueError`` (one line) for a value that is
    not an int >= 2 or one given without ``gptq``."""
    value = options.get("holdout")
    if value is None:
        return 0
    try:
        every = int(value)
    except (TypeError, ValueError):
        every = 0
    if every < 2 or str(value).strip() != str(every):
        raise ValueError(f"--holdout takes an int K >= 2 (every K-th calibration window held out), got {value!r}")
    if not options.get("gptq"):
        raise ValueError("--holdout chooses between GPTQ and the importance search per tensor; add --gptq")
    return every


def _check_options(options: Mapping[str, Any]) -> None:
    holdout_every(options)
    if options.get("type"):
        ft = file_type(options["type"])
        if ft.name in NEEDS_IMATRIX and not (options.get("imatrix") or options.get("gptq")):
            raise ValueError(f"{ft.name} needs an importance matrix, as in llama.cpp: add --imatrix or --gptq")


GGUF = Exporter(
    name="gguf",
    writes="file",
    help="one .gguf file that llama.cpp runs (float types, Q*_0/Q*_1, K-quants, IQ4_NL/IQ4_XS, IQ3_XXS, IQ2_XS, "
         "MXFP4, TQ1_0/TQ2_0 and llama.cpp's mixes)",
    write=write_gguf,
    lossless=lossless_mismatch,
    cannot_write={Feature.ONLINE_ROTATION: "llama.cpp does not run it; quantize without --rotate to export GGUF"},
    options=(
        Option("type", "F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, MXFP4, IQ3_XXS, "
                       "Q3_K_M, Q4_K_M, Q5_K_M, IQ4_NL, IQ4_XS, IQ2_XS (with --imatrix or --gptq), TQ1_0 or TQ2_0 "
                       "(default: the GGUF type the model's quantized layers are, e.g. int8 g32 sym Q8_0)"),
        Option("imatrix", "choose block scales by importance (mean x^2 per input column) from calibration text",
               switch=True),
        Option("gptq", "GPTQ onto the block grid with Hessians from calibration text (implies --imatrix)",
               switch=True),
        Option("holdout", "with --gptq: hold out every K-th calibration window (K >= 2; 4 holds out a quarter); "
                          "GPTQ and the importance search are fitted on the others and each tensor keeps the one "
                          "with the smaller output error on the held-out windows"),
    ),
    statistics=_statistics,
    check_options=_check_options,
)

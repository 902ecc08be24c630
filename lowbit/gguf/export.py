"""Hugging Face causal LM -> one ``.gguf`` file that llama.cpp runs.

    report = export_gguf(model, tokenizer, "smollm2-q4_k_m.gguf", "Q4_K_M")

The file is built in two passes so memory stays at one tensor beyond the model: first every
tensor is named (gguf-py's ``TensorNameMap``), shaped and given its type (``mixes``), which fixes
the header; then each weight is converted (Llama's q/k rows permuted to GGML's RoPE layout,
Gemma's norms shifted by +1), quantized with ``blocks.quantize_rows`` and streamed to a
temporary sibling that is renamed to ``path`` once complete (``lowbit.io.output``).
``lowbit.io.export`` puts this writer behind the exporter table, which refuses what GGUF cannot
hold (an online input rotation) and an existing output before it is called. Hyper-parameter and tokenizer keys come from
``metadata``. ``transformers`` can load the result back (``from_pretrained(dir, gguf_file=name)``
undoes the permutation and the norm shift), which is how the tests check the conventions.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import (
    GGML_QUANT_SIZES,
    GGML_QUANT_VERSION,
    MODEL_ARCH_NAMES,
    GGMLQuantizationType,
    GGUFWriter,
    get_tensor_name_map,
)

from lowbit.gguf import blocks
from lowbit.gguf import codes as codes_of
from lowbit.gguf.gptq_blocks import gptq_quantize_rows
from lowbit.gguf.metadata import GGUFArchitecture, add_tokenizer, architecture_of
from lowbit.gguf.mixes import NEEDS_IMATRIX, FileType, ModelShape, TensorSpec, file_type, tensor_type
from lowbit.io.model_card import QUANTIZED_BY, ModelOrigin, model_origin
from lowbit.io.output import staged_output
from lowbit.nn.float_view import float_view
from lowbit.pipeline.lazy_model import source_of, tensor_name

GPTQ_TYPES = frozenset(blocks.CODECS)  # the block types; float types have no grid to feed errors into
ENCODE_VALUES = 1 << 22  # a weight is encoded this many values at a time (16 MB of float32), its bytes in place


@dataclass(frozen=True)
class TensorRecord:
    """One tensor of the written file: GGUF name, shape ``[rows, cols]`` (numpy order), type name, bytes."""

    name: str
    shape: tuple[int, ...]
    qtype: str
    nbytes: int


@dataclass
class ExportReport:
    """What ``export_gguf`` wrote.

    Fields:
        path: the finished file.
        qtype: the requested file type, e.g. ``"Q4_K_M"``.
        tensors: every tensor in file order, with the type it got.
        fallbacks: one line per tensor whose type fell back because its rows do not split into
            whole blocks (see ``mixes``), e.g. ``"blk.0.attn_q.weight: 576 columns are not a
            multiple of Q4_K's 256 -> Q5_0"``.
        file_size: bytes on disk, header and alignment padding included.
        copied: tensors whose lowbit codes were written as they are (their scheme is the GGUF type).
        requantized: one line per lowbit-quantized tensor whose scheme is not the planned GGUF type,
            so its dequantized values were quantized again (saying why).
        gptq: tensors quantized by GPTQ onto the block grid (``statistics`` with Hessians).
        searched: tensors given a Hessian where GPTQ's result had the larger output error
            ``tr(dW H dW^T)`` on the calibration Hessian than the importance-weighted search alone,
            so the search's blocks were written (weights already on the type's grid, for instance
            a model that was this GGUF type before, which the search finds again and GPTQ leaves).
            With held-out statistics (``SplitMoments``) both are fitted on the fitting windows and
            judged on the held-out windows' Hessian instead (``heldout``).
        heldout_errors: with held-out statistics, per tensor in ``gptq`` or ``searched``, the
            held-out output error of each: ``{"gptq": e1, "search": e2}``.
        calibration: what calibration chose the blocks: ``"gptq"``, ``"imatrix"`` or None.
        calibration_tokens: calibration tokens behind the statistics (0 without).
    """

    path: Path
    qtype: str
    tensors: list[TensorRecord] = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)
    file_size: int = 0
    copied: list[str] = field(default_factory=list)
    requantized: list[str] = field(default_factory=list)
    gptq: list[str] = field(default_factory=list)
    searched: list[str] = field(default_factory=list)
    heldout_errors: dict[str, dict[str, float]] = field(default_factory=dict)
    calibration: str | None = None
    calibration_tokens: int = 0

    @property
    def n_params(self) -> int:
        """Number of stored values (the tied output matrix is stored once)."""
        return sum(int(np.prod(t.shape)) for t in self.tensors)

    @property
    def bits_per_weight(self) -> float:
        """Tensor bytes x 8 / stored values: scales and block minima included, header excluded."""
        return 8 * sum(t.nbytes for t in self.tensors) / max(self.n_params, 1)

    def type_counts(self) -> dict[str, int]:
        """How many tensors got each type, e.g. ``{"F32": 61, "Q5_0": 150, ...}``."""
        counts: dict[str, int] = {}
        for t in self.tensors:
            counts[t.qtype] = counts.get(t.qtype, 0) + 1
        return counts

    def to_dict(self) -> dict[str, Any]:
        """The facts as JSON values: counts of copied and GPTQ'd tensors, the re-quantized ones by line."""
        return {"path": str(self.path), "type": self.qtype, "file_size": self.file_size,
                "bits_per_weight": self.bits_per_weight, "tensor_types": self.type_counts(),
                "fallbacks": self.fallbacks, "copied": len(self.copied), "requantized": self.requantized,
                "gptq": len(self.gptq), "searched": len(self.searched), "calibration_tokens": self.calibration_tokens,
                **({"heldout_choice": {name: ("gptq" if name in self.gptq else "search", errors)
                                       for name, errors in self.heldout_errors.items()}}
                   if self.heldout_errors else {})}

    def summary(self) -> list[str]:
        """Lines for a person: size and types, then fallbacks, copies and re-quantized tensors (first five)."""
        types = ", ".join(f"{n} {t}" for t, n in sorted(self.type_counts().items()))
        how = {"gptq": "GPTQ onto the block grids", "imatrix": "importance-weighted scales"}.get(
            self.calibration or "", "no imatrix")
        lines = [f"{self.path}: {self.qtype}, {self.file_size / 2**20:.1f} MiB, {self.bits_per_weight:.3f} bits per "
                 f"stored value; tensors: {types}; {how}"]
        if self.fallbacks:
            lines.append(f"{len(self.fallbacks)} tensors fell back to another type because their rows do not split "
                         f"into whole blocks, e.g. {self.fallbacks[0]}")
        if self.searched:
            on = "the held-out calibration windows" if self.heldout_errors else "the calibration data"
            lines.append(f"{len(self.searched)} tensors kept the importance-weighted search's blocks, whose output "
                         f"error on {on} was below GPTQ's, e.g. {self.searched[0]}")
        if self.copied:
            lines.append(f"{len(self.copied)} tensors copied bit for bit from lowbit's codes")
        lines += [f"re-quantized (not lossless): {line}" for line in self.requantized[:5]]
        if len(self.requantized) > 5:
            lines.append(f"... and {len(self.requantized) - 5} more re-quantized tensors")
        return lines


@dataclass(frozen=True)
class _Planned:
    """A tensor to write: where it comes from in the HF model and what it becomes."""

    hf_name: str
    spec: TensorSpec
    qtype: GGMLQuantizationType
    fallback: str | None


def _row_bytes(qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> int:
    values, size = GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // values * size)


def _tied(model: Any) -> bool:
    """Whether the output projection is the input embedding (llama.cpp then reuses ``token_embd``)."""
    output = model.get_output_embeddings()
    return output is None or output.weight is model.get_input_embeddings().weight


def _model_shape(model: Any, has_imatrix: bool) -> ModelShape:
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    # llama.cpp's LLM_TYPE_70B: an 80-layer Llama with grouped-query attention
    seventy_b = config.model_type == "llama" and config.num_hidden_layers == 80 and heads != kv_heads
    return ModelShape(config.num_hidden_layers, _tied(model), more_v_bits=seventy_b, n_gqa=heads // kv_heads,
                      has_imatrix=has_imatrix)


def plan_tensors(model: Any, qtype: str, tensor_types: Mapping[str, str] | None = None, *,
                 has_imatrix: bool = False) -> list[tuple[str, str, tuple[int, ...], str, str | None]]:
    """``(hf_name, gguf_name, shape, type, fallback note)`` for every tensor ``export_gguf`` would write;
    ``tensor_types`` (GGUF tensor name -> type) as ``export_gguf`` takes them; ``has_imatrix``: whether
    importance or statistics will be passed (IQ4_NL/IQ4_XS's ``ffn_down`` rule).

    Cheap (no data is converted): use it to see a mix before exporting. Raises like ``export_gguf``.
    """
    return [(p.hf_name, p.spec.name, p.spec.shape, p.qtype.name, p.fallback)
            for p in _plan(model, architecture_of(model), file_type(qtype), has_imatrix, tensor_types)]


def _plan(model: Any, arch: GGUFArchitecture, ft: FileType, has_imatrix: bool,
          tensor_types: Mapping[str, str] | None = None) -> list[_Planned]:
    """Name, shape and type every parameter (``tensor_types`` first, then the file type's rules);
    ``ValueError`` for one llama.cpp has no name for, or a chosen type that does not fit."""
    names = get_tensor_name_map(arch.arch, model.config.num_hidden_layers)
    shape = _model_shape(model, has_imatrix)
    chosen = dict(tensor_types or {})
    planned = []
    for hf_name, param in model.named_parameters():  # a tied lm_head is the embedding: listed once
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"parameter {hf_name!r} has no GGUF tensor name for {MODEL_ARCH_NAMES[arch.arch]}; "
                             "export a float model (not one already quantized by lowbit)")
        spec = TensorSpec(gguf_name, tuple(param.shape))
        if hf_name in chosen:
            planned.append(_Planned(hf_name, spec, _chosen_type(hf_name, chosen.pop(hf_name), spec), None))
        else:
            planned.append(_Planned(hf_name, spec, *tensor_type(ft, spec, shape)))
    if chosen:
        raise ValueError(f"tensor_types names {len(chosen)} parameters the model does not have, e.g. "
                         f"{next(iter(chosen))!r}; keys are parameter names like 'model.layers.0.mlp.down_proj.weight'")
    return planned


def _chosen_type(hf_name: str, type_name: str, spec: TensorSpec) -> GGMLQuantizationType:
    """The GGUF type ``type_name`` for the weight matrix ``spec``, checked to be one lowbit writes and to fit."""
    qtype = getattr(GGMLQuantizationType, str(type_name), None)
    if qtype is None or qtype not in blocks.SUPPORTED_TYPES:
        raise ValueError(f"tensor_types[{hf_name!r}] = {type_name!r} is not a GGUF type lowbit writes; "
                         f"valid: {', '.join(t.name for t in blocks.SUPPORTED_TYPES)}")
    if len(spec.shape) != 2 or not blocks.fits(qtype, spec.shape[-1]):
        raise ValueError(f"tensor_types[{hf_name!r}] = {type_name}: {spec.name} {spec.shape} does not split into "
                         f"whole {type_name} blocks of {blocks.block_size(qtype)} values per row")
    return qtype


def _permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half rows of each head -> GGML's interleaved pairs (``LlamaModel.permute``)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_values(p: _Planned, param: torch.Tensor, arch: GGUFArchitecture, config: Any) -> np.ndarray:
    """The float32 values llama.cpp expects for parameter ``p`` (permuted/shifted as needed)."""
    w = param.detach().to(device="cpu", dtype=torch.float32).numpy()
    heads = _rope_heads(p, arch, config)
    if heads is not None:
        w = _permute_rope(w, heads)
    if arch.norm_offset and p.spec.name.endswith("norm.weight"):
        w = w + np.float32(arch.norm_offset)
    return w


def _encode(p: _Planned, values: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
    """``values`` in ``p.qtype`` as the bytes GGUF stores (1-D tensors are F32).

    Rows are encoded independently, so a large matrix (a 151936-row embedding is 0.9 GB in float32)
    goes ``ENCODE_VALUES`` at a time into its preallocated bytes: the same bytes as one call, without
    ``quantize_rows``' full-size temporaries, and with only the rows in hand of a memory-mapped source.
    """
    if values.ndim == 1:
        if not np.isfinite(values).all():  # matrices are checked by quantize_rows
            raise ValueError(f"{p.spec.name} has {int((~np.isfinite(values)).sum())} NaN/Inf values "
                             "(check the source model)")
        return np.ascontiguousarray(values, dtype="<f4").view(np.uint8)
    rows = values.reshape(-1, values.shape[-1])
    out = np.empty((rows.shape[0], _row_bytes(p.qtype, (1, rows.shape[1]))), dtype=np.uint8)
    step = max(1, ENCODE_VALUES // rows.shape[1])
    for i in range(0, rows.shape[0], step):
        out[i:i + step] = blocks.quantize_rows(rows[i:i + step], p.qtype, importance)
    return out


def _gptq_or_search(p: _Planned, values: np.ndarray, importance: np.ndarray | None, hessian: torch.Tensor,
                    judge: torch.Tensor | None = None) -> tuple[np.ndarray, list[float]]:
    """GPTQ onto ``p.qtype``'s block grid, or the plain importance-weighted search when that has the
    smaller output error ``tr(dW H dW^T)``, with ``H`` the Hessian ``judge`` (held-out windows',
    ``lowbit.pipeline.holdout``) or, without it, ``hessian``, the one GPTQ was fitted to;
    (bytes, [GPTQ's error, the search's])."""
    rows = values.reshape(-1, values.shape[-1])
    candidates = [gptq_quantize_rows(rows, hessian, p.qtype, importance=importance),
                  blocks.quantize_rows(rows, p.qtype, importance)]
    H = (hessian if judge is None else judge).detach().to("cpu", torch.float32)
    errors = []
    for data in candidates:
        delta = torch.from_numpy(blocks.dequantize_rows(data, p.qtype, rows.shape[1]) - rows)
        errors.append(float(((delta @ H) * delta).sum()))
    return candidates[0] if errors[0] <= errors[1] else candidates[1], errors


def _permuted_bytes(p: _Planned, data: np.ndarray, arch: GGUFArchitecture, config: Any) -> np.ndarray:
    """Already-encoded rows of a q/k projection, reordered as ``_gguf_values`` reorders the values."""
    heads = _rope_heads(p, arch, config)
    return data if heads is None else _permute_rope(data, heads)


def _rope_heads(p: _Planned, arch: GGUFArchitecture, config: Any) -> int | None:
    """The head count whose rows llama.cpp's q/k permutation regroups for ``p``, or None (no permutation)."""
    if not arch.permute_qk:
        return None
    if p.hf_name.endswith(("q_proj.weight", "q_proj.bias")):
        return config.num_attention_heads
    if p.hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        return config.num_key_value_heads or config.num_attention_heads
    return None


def _importance_by_param(importance: dict[str, np.ndarray], model: Any,
                         planned: list[_Planned]) -> dict[str, np.ndarray]:
    """``importance`` re-keyed by parameter name, after checking every key and shape.

    Keys are linear module names; the output projection of a tied model (``lm_head``) weights
    ``token_embd``, the matrix llama.cpp multiplies by there, as its imatrix does.
    """
    params = {p.hf_name.removesuffix(".weight"): p for p in planned if len(p.spec.shape) == 2}
    output = model.get_output_embeddings()
    if output is not None and _tied(model):
        embed = next(p for p in planned if p.spec.name == "token_embd.weight")
        params.update({name: embed for name, module in model.named_modules() if module is output})
    unknown = sorted(set(importance) - set(params))
    if unknown:
        raise ValueError(f"importance names {len(unknown)} modules that are not weight matrices of this model, "
                         f"e.g. {unknown[0]!r}; keys must be module names like 'model.layers.0.self_attn.q_proj'")
    for name, values in importance.items():
        cols = params[name].spec.shape[-1]
        if np.shape(values) != (cols,):
            raise ValueError(f"importance[{name!r}] has shape {np.shape(values)}, expected ({cols},): "
                             "one mean x^2 per input column")
    return {params[name].hf_name: values for name, values in importance.items()}


def _model_name(config: Any) -> str:
    """``general.name``: the name a GGUF-converted config kept, else the checkpoint's directory name."""
    name = getattr(config, "_model_name_or_path", None) or Path(str(config.name_or_path or "")).name
    return name or config.model_type


def add_origin(writer: GGUFWriter, origin: ModelOrigin) -> None:
    """``general.license`` (as the source states it), ``general.base_model.0.name`` and
    ``general.quantized_by``; a source without a licence gets a warning, not a guessed licence."""
    if origin.license:
        writer.add_license(origin.license)
    else:
        warnings.warn(f"the source model ({origin.where}) states no licence; the GGUF file has no general.license",
                      stacklevel=3)
    if origin.name:
        writer.add_base_model_count(1)
        writer.add_base_model_name(0, origin.name)
    writer.add_quantized_by(QUANTIZED_BY)


def export_gguf(model: Any, tokenizer: Any, path: str | Path, qtype: str, *,
                importance: dict[str, np.ndarray] | None = None,
                statistics: Iterable[Mapping[str, Any]] | None = None,
                tensor_types: Mapping[str, str] | None = None) -> ExportReport:
    """Write ``model`` and ``tokenizer`` to ``path`` as a GGUF file of type ``qtype``.

    Args:
        model: a float Hugging Face causal LM (``LlamaForCausalLM``, ``Gemma3ForCausalLM``,
            ``Qwen2ForCausalLM``); it is only read. Tied input/output embeddings are written once, as
            llama.cpp expects. A model from ``lowbit.pipeline.lazy_model.load_lazy`` (weights on the
            meta device) is read from its files one tensor at a time, as pages of the mapped file
            that the kernel may drop again, so a model larger than memory exports in bounded memory
            (without ``statistics``, which run the model itself).
        tokenizer: its fast Hugging Face tokenizer (vocabulary, special ids, chat template).
        path: the ``.gguf`` file to create or replace (its directory too, if missing); only a GGUF
            file is replaced, and ``.<name>.partial-<pid>-*`` beside it holds the file while it is
            written (``lowbit.io.output.staged_output``).
        qtype: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, MXFP4, IQ3_XXS
            (one type for every weight matrix) or the llama.cpp mixes Q3_K_M, Q4_K_M, Q5_K_M, IQ4_NL, IQ4_XS,
            TQ1_0, TQ2_0 (see ``mixes``).
        importance: optional imatrix: HF linear module name (``"model.layers.0.self_attn.q_proj"``)
            -> float32 ``[in_features]``, the mean of ``x^2`` of each input column; passed to the
            quantizer of that weight (llama.cpp's ``--imatrix``). A tied model's ``lm_head`` entry
            weights ``token_embd``.
        statistics: instead of ``importance``, chunks (per decoder block, then the linears outside
            them) of HF linear module name -> record with ``sqmean`` (float32 ``[in_features]``
            mean of ``x^2``: the imatrix) and ``H`` (``2 X^T X / n`` or None), and optionally ``H_held``
            (``SplitMoments``: the others are then the fitting windows', and GPTQ or the search is
            chosen on the held-out windows' Hessian), as
            ``pipeline.statistics.stream_input_statistics`` yields with ``InputMoments``; iterated
            inside the export (a lazy stream sees the float view of a lowbit-quantized model). A
            weight whose record has ``H`` is quantized by GPTQ onto its type's block grid as its
            chunk arrives (not the embedding); one chunk is referenced at a time, so at most one
            block's Hessians are alive, and the encoded bytes wait for their place in the file.
        tensor_types: HF parameter name -> GGUF type name (``"model.layers.0.mlp.down_proj.weight":
            "Q6_K"``), chosen per tensor (``lowbit.auto.allocate_gguf``); each must fit its row
            length. The named parameters take these types, every other one ``qtype``'s rules.

    A model quantized by lowbit (``QuantLinear`` layers) is written too: a layer whose scheme is
    exactly its planned GGUF type (int8 g32 sym -> Q8_0, int4 g32 sym -> Q4_0, int4 g32 with a
    float minimum -> Q4_1, ...) has its codes copied bit for bit; any other is dequantized and
    quantized again, and ``report.requantized`` says which and why.

    Returns:
        an ``ExportReport``: per-tensor types and bytes, the fallbacks taken, the file size.

    Raises:
        ValueError: unknown ``qtype``, unsupported architecture or tokenizer, malformed ``importance``,
            both ``importance`` and ``statistics``, or IQ2_XS with neither.
        FileExistsError: something other than a GGUF file is at ``path``.
        OutputError: ``path`` cannot be written, or another process is writing it.
    """
    path = Path(path)
    ft = file_type(qtype)
    arch = architecture_of(model)
    if importance is not None and statistics is not None:
        raise ValueError("pass importance or statistics, not both (statistics carry their own importance)")
    if statistics is not None and source_of(model) is not None:
        raise ValueError("calibration statistics run the whole model, which a lazily loaded one does not hold; "
                         "load it with lowbit.load, or export without --imatrix/--gptq")
    if ft.name in NEEDS_IMATRIX and importance is None and statistics is None:
        raise ValueError(f"{ft.name} needs an importance matrix, as in llama.cpp: pass importance or statistics "
                         "(lowbit export --imatrix or --gptq)")
    with float_view(model) as codes:
        planned = _plan(model, arch, ft, importance is not None or statistics is not None, tensor_types)
        report = ExportReport(path, ft.name, fallbacks=[p.fallback for p in planned if p.fallback])
        encoded: dict[str, np.ndarray] = {}
        if statistics is not None:
            importance, encoded = _consume_statistics(model, arch, planned, statistics, codes, report)
        importance_of = _importance_by_param(importance or {}, model, planned)
        return _write(model, tokenizer, path, ft, arch, planned, importance_of, encoded, codes, report)


def _gptq_applies(p: _Planned) -> bool:
    """Whether GPTQ onto the block grid is tried for ``p``: a weight matrix of a block type, not the
    embedding (a lookup table, whose rows see no inputs)."""
    return p.qtype in GPTQ_TYPES and p.spec.name != "token_embd.weight" and len(p.spec.shape) == 2


def _consume_statistics(model: Any, arch: GGUFArchitecture, planned: list[_Planned],
                        statistics: Iterable[Mapping[str, Any]], codes: dict[str, Any],
                        report: ExportReport) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Read ``statistics`` chunk by chunk: every linear's imatrix, and the bytes of the weights whose
    record has a Hessian (GPTQ or the search, whichever has the smaller output error), encoded
    while their chunk is the only one referenced."""
    by_module = {p.hf_name.removesuffix(".weight"): p for p in planned if _gptq_applies(p)}
    params = dict(model.named_parameters())
    importance: dict[str, np.ndarray] = {}
    encoded: dict[str, np.ndarray] = {}

    def take(chunk: Mapping[str, Any]) -> None:  # a function, so no record outlives its chunk in a local
        for name, record in chunk.items():
            importance[name] = record.sqmean.detach().to("cpu", torch.float32).numpy()
            p = by_module.get(name)
            if p is not None and record.H is not None:
                encoded[p.hf_name] = _tensor_bytes(p, params[p.hf_name], codes.get(p.hf_name), arch, model.config,
                                                   importance[name], record.H, report, getattr(record, "H_held", None))

    for chunk in statistics:
        take(chunk)
        del chunk  # before the next chunk is computed
    return importance, encoded


def _metadata_writer(model: Any, tokenizer: Any, arch: GGUFArchitecture, ft: FileType) -> GGUFWriter:
    """A writer holding the file's metadata (name, origin and licence, hyper-parameters, file type,
    tokenizer), before any tensor info: what ``_write`` writes and ``header_bytes`` measures."""
    writer = GGUFWriter(None, MODEL_ARCH_NAMES[arch.arch])
    writer.add_type("model")
    writer.add_name(_model_name(model.config))
    add_origin(writer, model_origin(model))
    arch.add_hparams(writer, model.config)
    writer.add_file_type(ft.ftype)
    writer.add_quantization_version(GGML_QUANT_VERSION)
    add_tokenizer(writer, tokenizer, model.get_input_embeddings().weight.shape[0])
    return writer


def _write(model: Any, tokenizer: Any, path: Path, ft: FileType, arch: GGUFArchitecture, planned: list[_Planned],
           importance_of: dict[str, np.ndarray], encoded: dict[str, np.ndarray], codes: dict[str, Any],
           report: ExportReport) -> ExportReport:
    """The header, then each tensor in turn (``encoded`` holds the bytes of those already encoded),
    into a temporary sibling (``lowbit.io.output.staged_output``); renamed to ``path`` when complete."""

    writer = _metadata_writer(model, tokenizer, arch, ft)
    for p in planned:
        nbytes = _row_bytes(p.qtype, p.spec.shape)
        writer.add_tensor_info(p.spec.name, p.spec.shape, np.dtype(np.float32), nbytes, raw_dtype=p.qtype)
        report.tensors.append(TensorRecord(p.spec.name, p.spec.shape, p.qtype.name, nbytes))

    params = dict(model.named_parameters())
    reader = source_of(model)
    # the caller decided on replacing (check_export); staged_output still replaces only a GGUF file
    with staged_output(path, overwrite=True, directory=False) as tmp:
        try:
            writer.write_header_to_file(tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for p in planned:
                data = encoded.pop(p.hf_name, None)
                if data is None:
                    param = params[p.hf_name]
                    if reader is not None and param.is_meta:  # a lazy model: the file's pages, read as encoded
                        param = reader.map(tensor_name(model, reader, p.hf_name))
                    data = _tensor_bytes(p, param, codes.get(p.hf_name), arch, model.config,
                                         importance_of.get(p.hf_name), None, report)
                writer.write_tensor_data(data)
        finally:
            writer.close()
    report.file_size = path.stat().st_size
    return report


def _tensor_bytes(p: _Planned, param: torch.Tensor, qweight: Any, arch: GGUFArchitecture, config: Any,
                  importance: np.ndarray | None, hessian: torch.Tensor | None, report: ExportReport,
                  judge: torch.Tensor | None = None) -> np.ndarray:
    """One tensor's stored bytes: lowbit's own codes when they are exactly ``p.qtype``, else encoded
    (with ``hessian``, GPTQ or the search, judged on ``judge`` when given: ``_gptq_or_search``)."""
    if qweight is not None:
        mapped = codes_of.lossless_type(qweight.scheme)
        if mapped == p.qtype:
            report.copied.append(p.spec.name)
            _, data = codes_of.from_quantized_weight(qweight)
            return _permuted_bytes(p, data, arch, config)
        why = codes_of.lossless_mismatch(qweight.scheme) or f"its scheme is {mapped.name}, not {p.qtype.name}"
        report.requantized.append(f"{p.spec.name}: {qweight.scheme.describe()} -> {p.qtype.name} ({why})")
    values = _gguf_values(p, param, arch, config)
    if hessian is not None and _gptq_applies(p):
        data, errors = _gptq_or_search(p, values, importance, hessian, judge)
        (report.gptq if errors[0] <= errors[1] else report.searched).append(p.spec.name)
        if judge is not None:
            report.heldout_errors[p.spec.name] = {"gptq": errors[0], "search": errors[1]}
        return data
    return _encode(p, values, importance)


def header_bytes(model: Any, tokenizer: Any, qtype: str, tensor_types: Mapping[str, str] | None = None) -> int:
    """Bytes of the file ``export_gguf`` would write before its first tensor's data: header, metadata
    (hyper-parameters, tokenizer) and tensor infos, padded to the alignment. Written to a temporary
    file and measured, so a size budget can subtract it exactly (the tensor types change only the
    infos' type fields, not their length). The metadata is ``_write``'s own (``_metadata_writer``),
    the source's licence and name included, so the two cannot drift apart."""
    import tempfile

    ft = file_type(qtype)
    arch = architecture_of(model)
    planned = _plan(model, arch, ft, False, tensor_types)  # the imatrix changes types, not the header's length
    with warnings.catch_warnings():  # a missing licence is said once, by the export itself
        warnings.simplefilter("ignore")
        writer = _metadata_writer(model, tokenizer, arch, ft)
    for p in planned:
        writer.add_tensor_info(p.spec.name, p.spec.shape, np.dtype(np.float32), _row_bytes(p.qtype, p.spec.shape),
                               raw_dtype=p.qtype)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "header.gguf"
        try:
            writer.write_header_to_file(path)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
        finally:
            writer.close()
        size = path.stat().st_size
    return -(-size // writer.data_alignment) * writer.data_alignment

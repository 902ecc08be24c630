"""A quantized ``.gguf`` file as a model whose layers hold the file's own codes.

``lowbit.gguf.to_float`` turns a GGUF into float weights (what ``pull`` and ``quantize`` start from).
Here every weight matrix whose block type is a lowbit scheme (``lowbit.gguf.codes.BLOCK_SCHEMES``:
Q8_0, Q4_0 ... Q6_K, IQ4_NL, IQ4_XS) becomes a ``QuantLinear`` holding the blocks' codes and scales as
they are, so ``lowbit.load``, ``eval`` and ``export`` run exactly the weights llama.cpp runs, and
exporting back to GGUF writes the same bytes. A tied embedding reads the LM head's codes
(``QuantEmbedding``). Everything else (norms, biases, an untied embedding, a weight of a type lowbit has
no codes for) is dequantized by gguf-py; quantized tensors dequantized so are named in one warning.

Tensor names and the architecture's fix-ups are transformers' (``get_gguf_hf_weights_map``,
``TENSOR_PROCESSORS``), as in ``to_float``. A fix-up of a quantized matrix must only reorder whole rows
(Llama's q/k permutation): it is run on the row numbers, and the rows of blocks are taken in that
order; a fix-up that changes values leaves that matrix dequantized.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lowbit.gguf.check import check_gguf
from lowbit.gguf.codes import BLOCK_SCHEMES, to_quantized_weight
from lowbit.io.tokenizer_files import load_tokenizer
from lowbit.nn import QuantLinear, set_submodule, tie_quantized_embedding

FLOAT_TYPES = ("F32", "F16", "BF16", "F64")


def load_gguf_codes(path: str | Path) -> tuple[nn.Module, Any]:
    """(model, tokenizer) of the GGUF file ``path`` with its mapped block types as lowbit codes.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a GGUF file, truncated, an architecture transformers does not map, or a tensor
            that fits no parameter of the model (one line each).
    """
    from gguf import GGUFReader
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor,
                                                          get_gguf_hf_weights_map, load_gguf_checkpoint)

    path = Path(path)
    check_gguf(path)
    reader = GGUFReader(path)
    architecture = str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8")
    try:
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        parsed = load_gguf_checkpoint(str(path), return_tensors=False)["config"]
    except (ValueError, KeyError, OSError) as e:
        raise ValueError(f"{path}: GGUF architecture {architecture!r} has no model lowbit can build "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:150]}); lowbit reads the GGUF "
                         "architectures transformers maps (llama, qwen2, gemma3, ...)") from None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=parsed)
    name_map = get_gguf_hf_weights_map(model, processor)
    unmapped = [t.name for t in reader.tensors if t.name not in name_map]
    if unmapped:
        raise ValueError(f"{path}: GGUF tensors {', '.join(unmapped[:3])} map to no parameter of "
                         f"{config.model_type}; lowbit cannot read this file")

    def fix_up(values: np.ndarray, name: str) -> np.ndarray:
        return processor.process(weights=values, name=name, tensor_key_mapping=name_map,
                                 parsed_parameters={"config": parsed}).weights

    params = dict(model.named_parameters())
    head = model.get_output_embeddings()
    tied_head = (getattr(config, "tie_word_embeddings", False) and isinstance(head, nn.Linear)
                 and not any(name_map[t.name] == "lm_head.weight" for t in reader.tensors))
    embedding_name = next(n for n, p in params.items() if p is model.get_input_embeddings().weight)
    linears = {n + ".weight": n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    if tied_head:
        linears[embedding_name] = next(n for n, m in model.named_modules() if m is head)
    missing = set(params) - {name_map[t.name] for t in reader.tensors}
    if missing:
        raise ValueError(f"{path}: no GGUF tensor provides {', '.join(sorted(missing)[:3])}; the file is incomplete")
    codes: dict[str, Any] = {}
    dequantized: list[str] = []
    for t in reader.tensors:
        hf_name = name_map[t.name]
        param = params.get(hf_name)
        if param is None:
            raise ValueError(f"{path}: GGUF tensor {t.name} maps to {hf_name}, which {config.model_type} does not have")
        shape = tuple(param.shape)
        order = _row_order(fix_up, t.name, shape[0]) if t.tensor_type in BLOCK_SCHEMES else None
        if hf_name in linears and len(shape) == 2 and order is not None:
            try:
                codes[linears[hf_name]] = to_quantized_weight(np.asarray(t.data)[order], t.tensor_type, shape)
            except ValueError as e:
                raise ValueError(f"{path}: GGUF tensor {t.name}: {e}") from None
            continue
        if t.tensor_type.name not in FLOAT_TYPES:
            dequantized.append(f"{t.name} ({t.tensor_type.name})")
        _copy_float(param, fix_up(_dequantize(t), t.name), t.name, path)
    for name, qw in codes.items():
        layer = model.get_submodule(name)
        set_submodule(model, name, QuantLinear.from_quantized(qw, layer.bias))
    if tied_head:
        tie_quantized_embedding(model)
    if dequantized:
        more = f" and {len(dequantized) - 4} more" if len(dequantized) > 4 else ""
        warnings.warn(f"{path.name}: {len(dequantized)} quantized tensors have no lowbit codes and were dequantized "
                      f"to float32: {', '.join(dequantized[:4])}{more}", stacklevel=2)
    model.config._name_or_path = str(path)
    return model.eval(), load_tokenizer(str(path.parent), str(path), gguf_file=path.name)


def _row_order(fix_up, name: str, rows: int) -> np.ndarray | None:
    """The row order the architecture's fix-up puts tensor ``name`` in (``None`` when it does more
    than reorder rows, so its blocks cannot be kept)."""
    index = np.arange(rows, dtype=np.float64).reshape(rows, 1)
    try:
        moved = np.asarray(fix_up(index, name))
    except (ValueError, TypeError, IndexError):
        return None
    if moved.shape != (rows, 1) or not np.array_equal(np.sort(moved[:, 0]), index[:, 0]):
        return None
    return moved[:, 0].astype(np.int64)


def _dequantize(t: Any) -> np.ndarray:
    from gguf import dequantize

    return dequantize(t.data, t.tensor_type)


def _copy_float(param: nn.Parameter, values: np.ndarray, name: str, path: Path) -> None:
    if values.size != param.numel():
        raise ValueError(f"{path}: GGUF tensor {name} has {values.size} values, the model's parameter "
                         f"{tuple(param.shape)} needs {param.numel()}")
    with torch.no_grad():
        param.copy_(torch.from_numpy(np.array(values, dtype=np.float32)).reshape(param.shape))  # a writable copy

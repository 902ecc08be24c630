"""A GGUF file to a float32 Hugging Face directory, one tensor at a time.

``AutoModelForCausalLM.from_pretrained(gguf_file=...)`` dequantizes every tensor into a dict, builds
the float model and ``save_pretrained`` serializes it: three float copies, about 19 GB for a 1.5B
model. Here the tensor names and the architecture's fix-ups (Llama's q/k row permutation, Gemma's
norm offset) are transformers' own (``get_gguf_hf_weights_map`` on a model built on the meta device,
``TENSOR_PROCESSORS``), but each tensor is dequantized by gguf-py, fixed up, appended to its
safetensors shard (``lowbit.io.sharded``) and dropped, and the GGUF's pages are released behind it:
memory stays at one float tensor (the embedding, 0.9 GB for Qwen2.5-1.5B).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from lowbit.io.sharded import ShardedWriter, TensorPlan


def convert_gguf_streaming(gguf_path: Path, hf_dir: Path, *, max_shard_bytes: int = 2 << 30,
                           progress: bool = False) -> None:
    """Write ``gguf_path``'s weights as float32 sharded safetensors, with its config.json and tokenizer,
    into ``hf_dir`` (created; the caller publishes it atomically).

    Raises:
        ValueError: an architecture transformers cannot read from GGUF, or a GGUF tensor that maps
            to no parameter of the model / a parameter no GGUF tensor provides.
    """
    from gguf import GGUFReader
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor,
                                                          get_gguf_hf_weights_map, load_gguf_checkpoint)
    from tqdm import tqdm

    kwargs = {"gguf_file": gguf_path.name}
    config = AutoConfig.from_pretrained(str(gguf_path.parent), **kwargs)
    with torch.device("meta"):
        meta_model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    parsed = load_gguf_checkpoint(str(gguf_path), return_tensors=False)["config"]
    reader = GGUFReader(gguf_path)
    architecture = str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8")
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=parsed)
    name_map = get_gguf_hf_weights_map(meta_model, processor)
    expected = dict(meta_model.state_dict())
    wanted = [t for t in reader.tensors if t.name in name_map]
    unmapped = [t.name for t in reader.tensors if t.name not in name_map]
    if unmapped:
        raise ValueError(f"{gguf_path}: GGUF tensors {', '.join(unmapped[:3])} map to no parameter of "
                         f"{config.model_type}; lowbit cannot convert this file")
    provided = {name_map[t.name] for t in wanted}
    tied = bool(getattr(config, "tie_word_embeddings", False))
    missing = [n for n in expected if n not in provided and not (tied and n == "lm_head.weight")]
    if missing:
        raise ValueError(f"{gguf_path}: no GGUF tensor provides {', '.join(missing[:3])}")
    plans = [TensorPlan(name_map[t.name], torch.float32, tuple(expected[name_map[t.name]].shape)) for t in wanted]
    del meta_model, expected
    fd = os.open(gguf_path, os.O_RDONLY)
    try:
        with ShardedWriter(hf_dir, plans, max_shard_bytes=max_shard_bytes, metadata={"format": "pt"}) as writer:
            for t, plan in tqdm(list(zip(wanted, plans)), desc="convert", unit="tensor", disable=not progress):
                writer.write(plan.name, _dequantized(t, plan.shape, lambda w: processor.process(
                    weights=w, name=t.name, tensor_key_mapping=name_map, parsed_parameters={"config": parsed}).weights))
                if hasattr(os, "posix_fadvise"):  # the GGUF's pages of this tensor are not read again
                    os.posix_fadvise(fd, int(t.data_offset), int(t.n_bytes), os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    del reader
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [AutoModelForCausalLM._model_mapping[type(config)].__name__]
    config.dtype = "float32"
    config.save_pretrained(hf_dir)
    AutoTokenizer.from_pretrained(str(gguf_path.parent), **kwargs).save_pretrained(hf_dir)



_CHUNK_ROWS = 4096  # rows dequantized at once for a large tensor: 25 MB of a 1536-wide float32 matrix


def _dequantized(t, shape: tuple[int, ...], process) -> torch.Tensor:
    """GGUF tensor ``t`` as float32 ``shape``, after the architecture's fix-up ``process``.

    gguf-py's dequantizers make several float temporaries of their input's size, so a large tensor
    (a 151936 x 1536 embedding) is dequantized a chunk of rows at a time into the result. Fix-ups
    that permute rows (Llama's q/k) see the whole tensor; those tensors are small.
    """
    from gguf import dequantize

    rows = t.data.shape[0] if t.data.ndim > 1 else 1
    whole = ".attn_q." in t.name or ".attn_k." in t.name or rows <= _CHUNK_ROWS
    if whole:
        weights = process(dequantize(t.data, t.tensor_type))
        return torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float32)).reshape(shape)
    out = torch.empty(shape, dtype=torch.float32)
    flat = out.view(rows, -1)
    for start in range(0, rows, _CHUNK_ROWS):
        part = process(dequantize(t.data[start:start + _CHUNK_ROWS], t.tensor_type))
        flat[start:start + part.shape[0]] = torch.from_numpy(np.ascontiguousarray(part, dtype=np.float32)).reshape(
            part.shape[0], -1)
    return out

"""A float model whose weights stay on disk until a block needs them.

``from_pretrained`` maps every safetensors file; under a cgroup memory limit the mapped pages count,
and a 1.5B float32 model is 6 GB of them. ``load_lazy`` builds the model on the meta device instead
(computed buffers such as rotary frequencies are real) and ``materialize`` reads one module's
tensors with ``lowbit.io.sharded.ShardedReader`` when it is needed; ``release`` puts it back on the
meta device once it is done with. The driver (``lowbit.pipeline.sequential``) materializes the
embedding to capture block 0's inputs, then one block at a time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.io.sharded import ShardedReader

LAZY_SOURCE = "_lowbit_lazy_source"  # attribute of a lazy model: its ShardedReader


def load_lazy(hf_dir: str | Path) -> nn.Module:
    """The causal LM of float Hugging Face directory ``hf_dir`` with every parameter on the meta
    device and its reader attached (``source_of``). Tied weights stay tied.

    Raises:
        FileNotFoundError: ``hf_dir`` has no safetensors weights.
        ValueError: a weights file that is not safetensors.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    reader = ShardedReader(hf_dir)
    config = AutoConfig.from_pretrained(str(hf_dir))
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.tie_weights()
    setattr(model, LAZY_SOURCE, reader)
    return model.eval()


def source_of(model: nn.Module) -> ShardedReader | None:
    """The reader of a model made by ``load_lazy``, else None."""
    return getattr(model, LAZY_SOURCE, None)


def tensor_name(model: nn.Module, reader: ShardedReader, name: str) -> str:
    """The file's name for parameter ``name``: itself, or the tensor it is tied to when the file
    stores only that one (``lm_head.weight`` of a model with tied embeddings)."""
    if name in reader.keys():
        return name
    output = model.get_output_embeddings()
    if getattr(model.config, "tie_word_embeddings", False) and output is not None and name.endswith(".weight"):
        if model.get_submodule(name[:-len(".weight")]) is output:
            embedding = model.get_input_embeddings()
            found = next(n for n, m in model.named_modules() if m is embedding)
            if f"{found}.weight" in reader.keys():
                return f"{found}.weight"
    raise KeyError(f"the model's weights have no tensor {name!r}")


def materialize(model: nn.Module, prefix: str, *, mapped: bool = False) -> None:
    """Read the parameters of submodule ``prefix`` (full name, "" for none) of lazy ``model`` from
    disk, replacing meta tensors; parameters already real are left alone. ``mapped``: as read-only
    views of the file (``ShardedReader.map``), for an embedding of which only some rows are read."""
    reader = source_of(model)
    if reader is None:
        return
    module = model.get_submodule(prefix) if prefix else model
    lead = f"{prefix}." if prefix else ""
    for local, param in list(module.named_parameters(recurse=True)):
        if not param.is_meta:
            continue
        name = tensor_name(model, reader, lead + local)
        value = reader.map(name) if mapped else reader.get(name)
        _set_parameter(module, local, nn.Parameter(value, requires_grad=False))


def release(module: nn.Module) -> None:
    """Put every parameter and buffer of ``module`` on the meta device, freeing their memory; the
    module's structure (and its quantized layers' layouts) stay."""
    module.to("meta")


def _set_parameter(module: nn.Module, local: str, value: nn.Parameter) -> None:
    owner_name, _, leaf = local.rpartition(".")
    owner: Any = module.get_submodule(owner_name) if owner_name else module
    setattr(owner, leaf, value)

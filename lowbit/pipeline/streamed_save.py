"""A lowbit checkpoint written from a ``BlockStore``, one tensor at a time.

With a ``BlockStore`` the quantized blocks are on disk, not in the model, and with a lazy model
(``lowbit.pipeline.lazy_model``) so are the float tensors outside the blocks (embedding, norm, an
LM head kept in float). ``save_streamed`` writes the same checkpoint ``lowbit.io.checkpoint
.save_quantized`` would, as sharded safetensors (``lowbit.io.sharded``): each tensor is read from
the store, the source model or the model, written, and dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from lowbit.io.checkpoint import RecordsItself, write_checkpoint_metadata
from lowbit.io.output import staged_output
from lowbit.io.sharded import ShardedReader, ShardedWriter, TensorPlan
from lowbit.nn.records import layer_records
from lowbit.pipeline.architectures import architecture_for
from lowbit.pipeline.block_store import BlockStore
from lowbit.pipeline.lazy_model import source_of, tensor_name


def save_streamed(model: nn.Module, store: BlockStore, out_dir: str | Path, *, recipe: RecordsItself,
                  tokenizer: Any = None, overwrite: bool = False, calibration: dict[str, Any] | None = None,
                  max_shard_bytes: int = 2 << 30) -> Path:
    """Write the checkpoint of ``model``, quantized by ``quantize_sequential`` with ``store``, to
    ``out_dir`` atomically (``lowbit.io.output`` rules, as ``save_quantized``).

    Raises:
        ValueError: the store does not hold every block of the model.
        FileExistsError, OutputError: as ``save_quantized``.
    """
    arch = architecture_for(model)
    blocks = arch.block_list(model)
    if store.done() != len(blocks):
        raise ValueError(f"{store.directory} holds {store.done()} of the model's {len(blocks)} blocks; "
                         "run the quantization to its end first")
    plans: list[TensorPlan] = []
    producers: list[Callable[[], Tensor]] = []
    layers: dict[str, Any] = {}
    source = source_of(model)
    prefix = arch.blocks + "."
    seen: set[int] = set()
    model.tie_weights()  # releasing the embedding to the meta device may have untied the LM head
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name.startswith(prefix) or id(tensor) in seen:  # blocks come from the store; a tied alias is stored once
            continue
        seen.add(id(tensor))
        plans.append(TensorPlan(name, tensor.dtype, tuple(tensor.shape)))
        if tensor.is_meta:
            producers.append(lambda n=tensor_name(model, source, name): source.map(n))  # pages, not heap
        else:
            producers.append(lambda t=tensor: t.detach())
    layers.update({n: r.to_entry() for n, r in layer_records(model).items() if not n.startswith(prefix)})
    for i in range(len(blocks)):
        reader = ShardedReader(store.directory, files=[store.block_path(i).name])
        for name in reader.keys():
            plans.append(TensorPlan(name, reader.dtype(name), reader.shape(name)))
            producers.append(lambda r=reader, n=name: r.get(n))
        layers.update(store.block_meta(i)[0])
    out_dir = Path(out_dir)
    with staged_output(out_dir, overwrite=overwrite, directory=True) as tmp:
        with ShardedWriter(tmp, plans, max_shard_bytes=max_shard_bytes, metadata={"format": "pt"}) as writer:
            for plan, produce in zip(plans, producers):
                writer.write(plan.name, produce())
        write_checkpoint_metadata(tmp, model, recipe=recipe, layers=layers, tokenizer=tokenizer,
                                  calibration=calibration)
    return out_dir

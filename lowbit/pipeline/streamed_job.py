"""``lowbit quantize --work-dir``: a calibrated job over a model streamed from disk, resumable.

The float model is built lazily (``lowbit.pipeline.lazy_model``), finished blocks and activations go
to the work directory (``lowbit.pipeline.block_store``), the checkpoint is written from there one
tensor at a time (``lowbit.pipeline.streamed_save``), and the work directory is removed once the
checkpoint is complete. Before any work the job checks that one block fits the process's memory
limit (``lowbit.pipeline.block_memory``).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lowbit.evaluate.speed import peak_rss_bytes
from lowbit.io.checkpoint import checkpoint_info
from lowbit.io.tokenizer_files import load_tokenizer
from lowbit.pipeline.architectures import architecture_for
from lowbit.pipeline.block_memory import block_bytes, check_block_fits, memory_limit
from lowbit.pipeline.block_store import BlockStore, fingerprint
from lowbit.pipeline.lazy_model import load_lazy
from lowbit.pipeline.recipe import Recipe, pinned_recipe
from lowbit.pipeline.sequential import statistics_needed
from lowbit.pipeline.streamed_save import save_streamed
from lowbit.sources import needs_bos, resolve_model


def quantize_streamed(source: str, recipe: Recipe, out: Path, work_dir: Path, *,
                      windows: Callable[[Any, Any], Tensor], provenance: dict[str, Any],
                      true_sequential: bool = False, overwrite: bool = False, progress: bool = True,
                      device: torch.device | str = "cpu") -> str:
    """Quantize float model ``source`` (a local Hugging Face directory or demo name) with calibrated
    ``recipe`` into checkpoint ``out``, keeping the job's state in ``work_dir``; return the summary line.

    ``windows(model, tokenizer)`` gives the calibration token ids; ``provenance`` records them.
    ``device``: where each block is quantized (``lowbit.pipeline.sequential``); the store and the
    checkpoint are written from the CPU.

    Raises:
        ValueError: a source that is not a local float directory, a data-free recipe, a store of
            another job in ``work_dir``, or a memory limit below what one block needs.
    """
    from lowbit.api import quantize

    start = time.perf_counter()
    resolved = resolve_model(source)
    if resolved.kind not in ("hf_dir", "demo"):
        raise ValueError(f"--work-dir streams a local float model directory; {source!r} is a {resolved.kind} source "
                         "(convert a .gguf with lowbit pull or a Hugging Face directory first)")
    if not statistics_needed(recipe):
        raise ValueError(f"--work-dir is for calibrated methods; {recipe.describe_method()!r} is data-free and "
                         "streams layer by layer without it")
    model = load_lazy(resolved.path)
    tokenizer = load_tokenizer(resolved.path, repr(source))
    calibration = windows(model, tokenizer)
    blocks = architecture_for(model).block_list(model)
    hidden = model.config.get_text_config().hidden_size
    check_block_fits(block_bytes(blocks[0], seqlen=calibration.shape[1],
                                 hidden=hidden, batch_size=4, hessian=True), memory_limit())
    store = BlockStore(work_dir, fingerprint(recipe.to_dict(), calibration, model.config.to_dict(),
                                             str(Path(resolved.path).resolve()), true_sequential))
    resumed = store.done()
    report = quantize(model, recipe, calibration=calibration, true_sequential=true_sequential, progress=progress,
                      store=store, device=device)
    if report.chosen:  # the held-out choice (restored from the store too): the stored recipe names each method
        recipe = pinned_recipe(recipe, report.chosen, report.layers)
    save_streamed(model, store, out, recipe=recipe, tokenizer=tokenizer, overwrite=overwrite,
                  calibration={**provenance, "bos": needs_bos(tokenizer)})
    shutil.rmtree(work_dir)
    info = checkpoint_info(out, verify=False)
    again = f", resumed after block {resumed}" if resumed else ""
    return (f"{out}: {len(report.layers)} layers {recipe.default.describe()} ({recipe.describe_method()}), "
            f"{info['bpw']:.4f} bits/weight, {info['disk_bytes'] / 2**20:.1f} MiB, kept in float: "
            f"{', '.join(report.kept_float) or 'none'}; streamed through {work_dir}{again}, "
            f"{time.perf_counter() - start:.1f} s, peak RSS {peak_rss_bytes() / 2**20:.0f} MiB")

"""Block-by-block calibration: quantize a model one decoder block at a time in bounded memory.

The data flow of DESIGN.md ("Data flow of the main job"), as IST-DASLab/gptq's ``llama_sequential``
runs it but for every architecture in ``ARCHITECTURES``:

1. Run the model on the calibration windows with every block's ``forward`` replaced by a recorder:
   block 0's records its input hidden states, every block records the arguments the model passes
   it (attention mask, rotary ``position_embeddings``, ``position_ids`` ...; Gemma 3 passes
   different ones to sliding and full attention blocks), the last one stops the forward.
2. For each block: hooks on its selected linears fold their inputs into Hessians
   (``accumulate_hessian``) while the block runs over all windows; each linear is quantized
   (``gptq_quantize``, or a data-free method from the registry) and swapped for a ``QuantLinear``;
   with ``true_sequential`` this is done group by group, re-running the block after each group so
   later groups see the quantized earlier ones.
3. The quantized block runs over all windows; its outputs, written over its inputs, feed the next
   block (GPTQ quantizes each block against the outputs of the already quantized blocks before it).

Memory: the float model, one ``[samples, seqlen, hidden]`` float32 activation buffer, one block's
Hessians, and one batch's intermediate activations. Everything runs on CPU in float32 unless the
model is in another dtype (activations are stored in float32 and cast to the model's dtype).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from lowbit.evaluate.speed import peak_rss_bytes
from lowbit.methods import get_method
from lowbit.methods.gptq import GPTQConfig, accumulate_hessian, gptq_quantize
from lowbit.nn import QuantLinear, set_submodule
from lowbit.pipeline.architectures import Architecture, architecture_for
from lowbit.pipeline.recipe import Recipe
from lowbit.qweight import QuantizedWeight
from lowbit.scheme import QuantScheme

# Per block, what the model passed it besides the hidden states: (extra positional args, kwargs).
BlockArgs = tuple[tuple[Any, ...], dict[str, Any]]


@dataclass
class SequentialReport:
    """What ``quantize_sequential`` did.

    Fields:
        method: ``"gptq"`` or the data-free registry method used inside the blocks.
        layers: scheme of every quantized linear, by full module name.
        layer_seconds: time spent quantizing each linear (the solve, not the forward passes).
        method_of: the method each quantized linear got; differs from ``method`` only for linears
            outside the decoder blocks, which see no calibration statistics and get ``rtn``.
        kept_float: linears the recipe keeps in float.
        block_seconds: wall time per block, forward passes included.
        warnings: messages of every warning raised while quantizing (GPTQ dampening retries).
        seconds: total wall time, capture included.
        peak_rss_bytes: the process's peak resident memory when the job ended (a high-water mark
            of the whole process, not only of this call).
    """

    method: str
    layers: dict[str, QuantScheme] = field(default_factory=dict)
    layer_seconds: dict[str, float] = field(default_factory=dict)
    method_of: dict[str, str] = field(default_factory=dict)
    kept_float: list[str] = field(default_factory=list)
    block_seconds: list[float] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    peak_rss_bytes: int = 0


class _StopForward(Exception):
    """Raised by the last block's recorder: nothing after the blocks is needed for calibration."""


def is_linear(module: nn.Module) -> bool:
    """A layer the pipeline can quantize: ``nn.Linear`` or transformers' ``Conv1D`` (GPT-2)."""
    return isinstance(module, (nn.Linear, Conv1D))


def linear_weight(module: nn.Module) -> Tensor:
    """The weight of a linear layer as ``[out_features, in_features]`` (``Conv1D`` stores ``[in, out]``)."""
    return module.weight.data.T if isinstance(module, Conv1D) else module.weight.data


@torch.no_grad()
def quantize_sequential(model: nn.Module, recipe: Recipe, calib: Tensor, *, method: str = "gptq",
                        gptq: GPTQConfig = GPTQConfig(), true_sequential: bool = False, batch_size: int = 8,
                        progress: bool = True) -> SequentialReport:
    """Quantize ``model`` in place, block by block, on calibration windows ``calib``.

    Args:
        model: a Hugging Face causal LM whose ``config.model_type`` is in ``ARCHITECTURES``.
        recipe: which scheme each linear gets (``recipe.scheme_for(full_name)``; None keeps float).
        calib: int64 token ids ``[samples, seqlen]`` (``calibration_windows``).
        method: ``"gptq"``, or the name of a data-free method in the registry (``"rtn"``), which
            then gets the same plumbing but ignores the statistics.
        gptq: GPTQ's knobs (dampening, act order, block size).
        true_sequential: quantize a block's linears group by group (``Architecture.sequential_groups``)
            so each group's Hessian comes from inputs that went through the quantized groups before it.
        batch_size: windows per forward pass; changes memory and speed, not the result beyond
            float rounding.
        progress: show a progress bar over blocks.

    Linears outside the decoder blocks that the recipe selects (``lm_head`` when not skipped, OPT's
    ``project_in``/``project_out``, a vision tower) are quantized with RTN, with a warning, and
    listed in ``report.method_of``.

    Raises:
        ValueError: unsupported architecture, bad ``calib``/``batch_size``/``method``, a recipe that
            selects no linear, a group size that does not divide a layer, or a GPTQ failure
            (naming the layer).
    """
    start = time.perf_counter()
    arch = architecture_for(model)
    blocks = arch.block_list(model)
    quantize_weight = _check_arguments(calib, batch_size, method)
    report = SequentialReport(method=method)
    plan, outside = _plan(model, arch, recipe, report)
    was_training = model.training
    model.eval()
    try:
        hidden, block_args = _capture_block_inputs(model, blocks, calib, batch_size)
        for i, block in enumerate(tqdm(blocks, desc=f"quantize ({method})", unit="block", disable=not progress)):
            block_start = time.perf_counter()
            for group in _groups(plan[i], arch, true_sequential):
                hessians = {}
                if quantize_weight is None:  # GPTQ
                    hessians = _collect_hessians(block, group, hidden, block_args[i], batch_size)
                for local in group:
                    name = f"{arch.blocks}.{i}.{local}"
                    qw = _quantize_layer(block.get_submodule(local), hessians.pop(local, None), plan[i][local],
                                         quantize_weight, gptq, name, report)
                    set_submodule(block, local, QuantLinear.from_quantized(qw, block.get_submodule(local).bias))
            if i + 1 < len(blocks):  # the quantized block's outputs are the next block's inputs
                _run_block(block, hidden, block_args[i], batch_size, write_back=True)
            report.block_seconds.append(time.perf_counter() - block_start)
        del hidden
        _quantize_outside(model, outside, report)
    finally:
        model.train(was_training)
    report.seconds = time.perf_counter() - start
    report.peak_rss_bytes = peak_rss_bytes()
    return report


def _check_arguments(calib: Tensor, batch_size: int, method: str):
    """Validate the call; return the data-free method's function (None for GPTQ)."""
    if not isinstance(calib, Tensor) or calib.dim() != 2 or calib.dtype != torch.long or calib.numel() == 0:
        what = f"{calib.dtype} {tuple(calib.shape)}" if isinstance(calib, Tensor) else type(calib).__name__
        raise ValueError(f"calib must be int64 token ids [samples, seqlen] (see calibration_windows), got {what}")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    return None if method == "gptq" else get_method(method)


def _plan(model: nn.Module, arch: Architecture, recipe: Recipe,
          report: SequentialReport) -> tuple[list[dict[str, QuantScheme]], dict[str, QuantScheme]]:
    """Per block, ``{local name: scheme}`` of its selected linears; and the selected linears outside
    the blocks. Fails before any work when the recipe selects nothing or a scheme cannot fit a layer."""
    plan: list[dict[str, QuantScheme]] = []
    for i, block in enumerate(arch.block_list(model)):
        plan.append({})
        for local, module in block.named_modules():
            if is_linear(module):
                name = f"{arch.blocks}.{i}.{local}"
                scheme = recipe.scheme_for(name)
                if scheme is None:
                    report.kept_float.append(name)
                else:
                    scheme.group_length(linear_weight(module).shape[1], name)
                    plan[i][local] = scheme
    prefix = arch.blocks + "."
    outside = {}
    for name, module in model.named_modules():
        if is_linear(module) and not name.startswith(prefix):
            scheme = recipe.scheme_for(name)
            if scheme is None:
                report.kept_float.append(name)
            else:
                scheme.group_length(linear_weight(module).shape[1], name)
                outside[name] = scheme
    if not outside and not any(plan):
        raise ValueError(f"the recipe selects none of the model's {len(report.kept_float)} linear layers; "
                         "check skip/overrides")
    return plan, outside


def _groups(selected: dict[str, QuantScheme], arch: Architecture, true_sequential: bool) -> list[list[str]]:
    """The block's selected linears in the order to quantize them: one group, or the true-sequential
    groups (selected linears the architecture's groups do not name come last, as one group)."""
    if not true_sequential:
        return [list(selected)] if selected else []
    groups = [[n for n in g if n in selected] for g in arch.sequential_groups]
    named = {n for g in groups for n in g}
    groups.append([n for n in selected if n not in named])
    return [g for g in groups if g]


def _capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, calib: Tensor,
                          batch_size: int) -> tuple[Tensor, list[dict[int, BlockArgs]]]:
    """Block 0's input hidden states for every window, float32 ``[samples, seqlen, hidden]``, and per
    block the arguments the model passes it, keyed by batch size (masks carry the batch dimension;
    only the last batch can be smaller)."""
    hidden: Tensor | None = None
    block_args: list[dict[int, BlockArgs]] = [{} for _ in blocks]
    batch = {"start": 0}

    def recorder(i: int):
        def forward(hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            nonlocal hidden
            if i == 0:
                if hidden is None:
                    hidden = torch.empty(calib.shape[0], *hidden_states.shape[1:], dtype=torch.float32)
                hidden[batch["start"]:batch["start"] + hidden_states.shape[0]] = hidden_states
            block_args[i].setdefault(hidden_states.shape[0], (args, kwargs))
            if i == len(blocks) - 1:
                raise _StopForward
            return hidden_states  # later blocks only record their arguments

        return forward

    for i, block in enumerate(blocks):
        block.forward = recorder(i)  # an instance attribute: hooks and attributes of the block stay
    try:
        for start in range(0, calib.shape[0], batch_size):
            batch["start"] = start
            try:
                model(input_ids=calib[start:start + batch_size], use_cache=False)
            except _StopForward:
                continue
            raise RuntimeError(f"{type(model).__name__}'s forward never reached its last decoder block")
    finally:
        for block in blocks:
            del block.forward
    assert hidden is not None  # the loop ran at least once and block 0 recorded
    return hidden, block_args


def _run_block(block: nn.Module, hidden: Tensor, args_by_size: dict[int, BlockArgs], batch_size: int, *,
               write_back: bool) -> None:
    """Run ``block`` over every window of ``hidden``, batch by batch; with ``write_back`` the outputs
    replace the inputs (each batch's output depends only on that batch's input)."""
    dtype = next((p.dtype for p in block.parameters() if p.is_floating_point()), torch.float32)
    for start in range(0, hidden.shape[0], batch_size):
        x = hidden[start:start + batch_size]
        args, kwargs = args_by_size[x.shape[0]]
        out = block(x.to(dtype), *args, **kwargs)
        if write_back:
            hidden[start:start + x.shape[0]] = out[0] if isinstance(out, tuple) else out


def _collect_hessians(block: nn.Module, group: list[str], hidden: Tensor, args_by_size: dict[int, BlockArgs],
                      batch_size: int) -> dict[str, Tensor]:
    """``H = 2 X^T X / n`` of each linear of ``group`` over all calibration windows."""
    stats: dict[str, tuple[Tensor | None, int]] = {local: (None, 0) for local in group}

    def hook(local: str):
        def add(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            H, n_seen = stats[local]
            stats[local] = accumulate_hessian(H, inputs[0], n_seen)

        return add

    handles = [block.get_submodule(local).register_forward_hook(hook(local)) for local in group]
    try:
        _run_block(block, hidden, args_by_size, batch_size, write_back=False)
    finally:
        for handle in handles:
            handle.remove()
    return {local: H for local, (H, _) in stats.items()}


def _quantize_layer(module: nn.Module, H: Tensor | None, scheme: QuantScheme, quantize_weight, gptq: GPTQConfig,
                    name: str, report: SequentialReport) -> QuantizedWeight:
    """One linear's ``QuantizedWeight``; records scheme, time and any warning in ``report``."""
    start = time.perf_counter()
    weight = linear_weight(module)
    if quantize_weight is None and H is None:
        raise ValueError(f"{name} received no input while its block ran on the calibration windows, so GPTQ "
                         "has no Hessian for it; skip it in the recipe or use method='rtn'")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if quantize_weight is None:
            qw = gptq_quantize(weight, H, scheme, gptq, layer=name)
        else:
            qw = quantize_weight(weight, scheme, layer=name)
    for w in caught:  # keep them in the report and still show them
        report.warnings.append(str(w.message))
        warnings.warn(w.message, w.category, stacklevel=3)
    report.layers[name] = scheme
    report.method_of[name] = report.method
    report.layer_seconds[name] = time.perf_counter() - start
    return qw


def _quantize_outside(model: nn.Module, outside: dict[str, QuantScheme], report: SequentialReport) -> None:
    """Selected linears outside the blocks get RTN: no block input was captured for them."""
    if not outside:
        return
    warnings.warn(f"{len(outside)} selected linear layers lie outside the decoder blocks and get RTN "
                  f"(no calibration statistics): {', '.join(outside)}; add them to the recipe's skip to keep "
                  "them in float", stacklevel=3)
    rtn = get_method("rtn")
    for name, scheme in outside.items():
        module = model.get_submodule(name)
        start = time.perf_counter()
        qw = rtn(linear_weight(module), scheme, layer=name)
        set_submodule(model, name, QuantLinear.from_quantized(qw, module.bias))
        report.layers[name] = scheme
        report.method_of[name] = "rtn"
        report.layer_seconds[name] = time.perf_counter() - start

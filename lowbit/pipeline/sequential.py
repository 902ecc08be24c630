"""The one quantization driver: data-free methods layer by layer, calibrated ones block by block.

Data-free (the recipe's method and transforms declare no statistics): every linear the recipe
selects (``nn.Linear`` or GPT-2's ``Conv1D``) is quantized where it is, with no forward pass and no
architecture record needed.

Calibrated: the data flow of DESIGN.md ("Data flow of the main job"), as IST-DASLab/gptq's
``llama_sequential`` runs it but for every architecture in ``ARCHITECTURES``:

1. Run the model on the calibration windows with every block's ``forward`` replaced by a recorder:
   block 0's records its input hidden states, every block records the arguments the model passes
   it (attention mask, rotary ``position_embeddings``, ``position_ids`` ...; Gemma 3 passes
   different ones to sliding and full attention blocks), the last one stops the forward.
2. For each block: hooks on its selected linears collect the statistics the recipe's transforms
   and method declare (``lowbit.methods.Statistic``) while the block runs over all windows; the
   channel-scaling transforms fold their scales in; each linear is quantized by the method
   (``Method.solve``, once for linears that share an input and a scheme) and swapped for a
   ``QuantLinear``; with ``true_sequential`` this is done group by group, re-running the block
   after each group so later groups see the quantized earlier ones.
3. The quantized block runs over all windows; its outputs, written over its inputs, feed the next
   block (GPTQ quantizes each block against the outputs of the already quantized blocks before it).

Memory: the float model, one ``[samples, seqlen, hidden]`` float32 activation buffer, one block's
Hessians, and one batch's intermediate activations. A block's float weights leave memory once it
is quantized, also when they are pages of a memory-mapped checkpoint (``lowbit.memory``), and so
do the embedding's once block 0's inputs are captured: of the float model, only the block being
quantized is resident. Everything runs in float32 unless the model is in another dtype (activations
are stored in float32 and cast to the model's dtype).

Device (``device``, ``lowbit.device``): the model stays on the CPU. On another device (CUDA), each
block in turn goes there with its arguments (masks, rotary embeddings); the activation buffer stays
on the CPU and goes there a batch at a time; statistics are collected and methods solve there, the
quantized block runs there to feed the next one, then comes back to the CPU before it is saved or
paged out: at most one block is on the device. Data-free methods move one weight at a time. What
runs on the whole model stays on the CPU: capturing block 0's inputs (the embedding lookup), a
rotation, the Fisher's backward passes (their per-weight results go to the device with their block).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from lowbit.device import resolve_device, to_device
from lowbit.evaluate.speed import peak_rss_bytes
from lowbit.memory import page_out, return_freed_heap
from lowbit.methods import Method, Statistic, TransformKind, get_method, get_transform
from lowbit.nn import QuantLinear, fold_input_scale, set_submodule
from lowbit.pipeline.activations import ActivationReport
from lowbit.pipeline.architectures import Architecture, architecture_for
from lowbit.pipeline.block_store import BlockStore
from lowbit.pipeline.distributed import Slices, gather_tensors, shared_solves
from lowbit.pipeline.fisher import collect_fisher
from lowbit.pipeline.lazy_model import materialize, release, source_of
from lowbit.pipeline.holdout import MethodChoice, choose_on_heldout, is_held_out
from lowbit.pipeline.recipe import Recipe, TransformStep
from lowbit.pipeline.statistics import (BlockStatistics, InputStatistics, capture_block_inputs,
                                        collect_block_statistics, fold_block_statistics, run_block,
                                        statistics_tensors, with_tensors)
from lowbit.qweight import QuantizedWeight, WeightLayout
from lowbit.scheme import QuantScheme


@dataclass
class QuantizeReport:
    """What ``quantize_sequential`` (and ``lowbit.quantize``) did.

    Fields:
        method: the recipe's transforms and method, ``Recipe.describe_method``.
        layers: scheme of every quantized linear, by full module name.
        layer_seconds: time spent quantizing each linear (the solve, not the forward passes).
        method_of: the method each quantized linear got: the recipe's, an override's or the held-out
            choice's, except ``rtn`` for linears outside the decoder blocks when their method needs
            statistics (they see none).
        kept_float: linears the recipe keeps in float.
        block_seconds: wall time per block, forward passes included (calibrated path only).
        details: per full module name (a linear, or an op a scale was folded into), per method or
            transform name, what it chose (plain values), e.g. ``{"model.layers.0.input_layernorm":
            {"awq": {"folded": True, "exponent": 0.35}}}``.
        warnings: messages of every warning raised while quantizing (GPTQ dampening retries,
            group-size fallbacks).
        seconds: total wall time, capture included.
        peak_rss_bytes: the process's peak resident memory when the job ended (a high-water mark
            of the whole process, not only of this call).
        activations: set by ``lowbit.api.quantize`` when the recipe quantizes activations too.
        fisher_seconds, fisher_windows: the Fisher's passes (``lowbit.pipeline.fisher``), when the
            method declares it: their wall time (in ``seconds`` too) and the windows they averaged.
        chosen: with the recipe's ``holdout``, the method (and config) each linear it chose for got;
            ``details[name]["holdout"]`` holds every candidate's held-out error
            (``lowbit.pipeline.recipe.pinned_recipe`` turns this into the recipe to store).
    """

    method: str
    layers: dict[str, QuantScheme] = field(default_factory=dict)
    layer_seconds: dict[str, float] = field(default_factory=dict)
    method_of: dict[str, str] = field(default_factory=dict)
    kept_float: list[str] = field(default_factory=list)
    block_seconds: list[float] = field(default_factory=list)
    details: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    activations: ActivationReport | None = None
    fisher_seconds: float = 0.0
    fisher_windows: int = 0
    chosen: dict[str, MethodChoice] = field(default_factory=dict)


def is_linear(module: nn.Module) -> bool:
    """A layer the pipeline can quantize: ``nn.Linear`` or transformers' ``Conv1D`` (GPT-2)."""
    return isinstance(module, (nn.Linear, Conv1D))


def linear_weight(module: nn.Module) -> Tensor:
    """The weight of a linear layer as ``[out_features, in_features]`` (``Conv1D`` stores ``[in, out]``)."""
    return module.weight.data.T if isinstance(module, Conv1D) else module.weight.data


def statistics_needed(recipe: Recipe) -> frozenset[Statistic]:
    """What the recipe's methods (its own, its overrides', its held-out candidates') and channel-scaling
    transforms read of the calibration inputs; a held-out choice reads the Hessian."""
    needed = _method_statistics(recipe.methods())
    for step in recipe.transforms:
        needed |= get_transform(step.name).statistics
    if recipe.holdout is not None:
        needed |= {Statistic.HESSIAN}
    return frozenset(needed)


def _method_statistics(choices: Sequence[MethodChoice]) -> set[Statistic]:
    return set().union(*(get_method(c.method).statistics for c in choices))


def _how(recipe: Recipe, name: str) -> MethodChoice | None:
    """How the linear ``name`` is quantized: the method an override pins, the recipe's method, or None
    when the recipe's ``holdout`` chooses it."""
    pinned = recipe.pinned_method(name)
    if pinned is not None or recipe.holdout is not None:
        return pinned
    return MethodChoice(recipe.method, recipe.method_config)


def _group_statistics(recipe: Recipe, names: list[str]) -> set[Statistic]:
    """What the linears ``names`` read of their inputs: their methods' statistics, or the Hessian and
    every candidate's statistics for those the held-out choice decides."""
    needed: set[Statistic] = set()
    for name in names:
        how = _how(recipe, name)
        if how is None:
            needed |= _method_statistics([MethodChoice(recipe.method, recipe.method_config),
                                          *recipe.holdout.candidates]) | {Statistic.HESSIAN}
        else:
            needed |= _method_statistics([how])
    return needed


@torch.no_grad()
def quantize_sequential(model: nn.Module, recipe: Recipe, calib: Tensor | None = None, *,
                        true_sequential: bool = False, batch_size: int = 4, progress: bool = True,
                        store: BlockStore | None = None, slices: Slices = Slices(),
                        device: torch.device | str = "cpu") -> QuantizeReport:
    """Quantize ``model`` in place as ``recipe`` says: rotations first, then the method, after the
    channel-scaling transforms where the recipe lists them.

    Args:
        model: any module with linears for a data-free recipe; a Hugging Face causal LM whose
            ``config.model_type`` is in ``ARCHITECTURES`` for one that needs statistics.
        recipe: method and its config, transforms, and which scheme each linear gets
            (``recipe.scheme_for_layer``; None keeps float).
        calib: int64 token ids ``[samples, seqlen]`` (``calibration_windows``); needed only when
            the method or a transform declares statistics.
        true_sequential: quantize a block's linears group by group (``Architecture.sequential_groups``)
            so each group's statistics come from inputs that went through the quantized groups
            before it. Channel scales are still searched on the float block, before any rounding.
        batch_size: windows per forward pass; changes memory and speed, not the result beyond
            float rounding. On SmolLM2 at 128 x 512 tokens, 4 instead of 8 took the peak RSS
            from 1069 to 794 MiB in the same time (attention and MLP intermediates of a batch).
        progress: show a progress bar.
        store: for a calibrated recipe, where each finished block and the activations after it go
            (``lowbit.pipeline.block_store``): the block then leaves memory (its tensors go to the meta
            device; ``lowbit.pipeline.streamed_save`` writes the checkpoint), and a job found half
            done in the store goes on from its last finished block. With a lazy model
            (``lowbit.pipeline.lazy_model``) each block's float weights are read only when its turn
            comes: memory holds one block, its activations and its statistics.
        slices: the fixed order statistics are summed in, and this process's share of the windows
            and solves when it is one rank of several (``lowbit.pipeline.distributed``); the default,
            one slice in one process, is the plain batch-by-batch sum.
        device: where blocks (calibrated) or weights (data-free) are quantized, as ``lowbit.device``
            resolves it ("cpu", "cuda", "cuda:N", "auto"); the model and the result stay on the CPU.

    With statistics, linears outside the decoder blocks that the recipe selects (``lm_head`` when
    not skipped, OPT's ``project_in``/``project_out``, a vision tower) see none: they get the
    method when it is data-free, else RTN, with a warning, and are listed in ``report.method_of``.

    Raises:
        ValueError: a recipe that selects no linear, a group size that does not divide a layer
            (unless the recipe's ``group_fallback`` says otherwise), a model the rotation cannot
            take; with statistics also: unsupported architecture, missing or bad ``calib``, bad
            ``batch_size``, fewer calibration tokens than a layer has inputs, a statistic no
            collector provides, or a method's failure (naming the layer); a device that is not
            there, or one other than the CPU for a job split across ranks.
    """
    start = time.perf_counter()
    device = resolve_device(device)
    if device.type != "cpu" and slices.distributed:
        raise ValueError(f"--device {device} with several ranks is not supported yet; run the ranks on the CPU, "
                         "or one process on the GPU")
    report = QuantizeReport(method=recipe.describe_method())
    for step in recipe.transforms:
        transform = get_transform(step.name)
        if transform.kind is TransformKind.ROTATION:
            transform.apply(model, step.config)
    needed = statistics_needed(recipe)
    lazy = source_of(model) is not None
    if lazy and any(get_transform(s.name).kind is TransformKind.ROTATION for s in recipe.transforms):
        raise ValueError("a rotation transform rotates the whole float model at once, which a model streamed "
                         "from disk does not hold; quantize it without --work-dir or without the rotation")
    if needed:
        if store is not None and slices.count > 1:
            raise ValueError("a job streamed through a work directory takes one reduction slice in one process")
        _quantize_blocks(model, recipe, needed, calib, report, true_sequential, batch_size, progress, store, slices,
                         device)
    else:
        if store is not None:
            raise ValueError("a block store is for calibrated recipes; a data-free one streams layer by layer")
        _quantize_data_free(model, recipe, report, progress, device)
    report.seconds = time.perf_counter() - start
    report.peak_rss_bytes = peak_rss_bytes()
    return report


def _quantize_data_free(model: nn.Module, recipe: Recipe, report: QuantizeReport, progress: bool,
                        device: torch.device) -> None:
    """Every selected linear of ``model`` with its data-free method (the recipe's or an override's),
    one at a time (each weight solved on ``device``, its result brought back to the weight's device)."""
    linears = [(n, m) for n, m in model.named_modules() if is_linear(m)]
    todo = []
    for name, module in linears:  # fail before any work on a layer whose shape the scheme cannot take
        scheme = _scheme_of(recipe, name, module, report)
        if scheme is not None:
            todo.append((name, module, scheme))
    if not todo:
        raise ValueError(f"the recipe selects none of the model's {len(linears)} linear layers; check skip/overrides")
    for name, module, scheme in tqdm(todo, desc=f"quantize ({report.method})", unit="layer", disable=not progress):
        materialize(model, name)  # a lazy model's layer is read from disk now, one at a time
        module = model.get_submodule(name)
        how = recipe.method_for(name)
        qw = _quantize_layer(module, scheme, get_method(how.method), how.config, name, report, device)
        set_submodule(model, name, QuantLinear.from_quantized(qw, module.bias))
        page_out([module.weight])


def _quantize_blocks(model: nn.Module, recipe: Recipe, needed: frozenset[Statistic], calib: Tensor | None,
                     report: QuantizeReport, true_sequential: bool, batch_size: int, progress: bool,
                     store: BlockStore | None, slices: Slices, device: torch.device) -> None:
    """The calibrated path of the module docstring (and ``store``'s and ``device``'s, ``quantize_sequential``)."""
    arch = architecture_for(model)
    blocks = arch.block_list(model)
    scalings = [s for s in recipe.transforms if get_transform(s.name).kind is TransformKind.CHANNEL_SCALING]
    _check_arguments(calib, batch_size, needed, recipe, slices)
    holdout_every = recipe.holdout.every if recipe.holdout is not None else 0
    plan, outside = _plan(model, arch, recipe, report)
    if Statistic.HESSIAN in needed:
        _check_enough_tokens(calib, model, plan, arch, holdout_every)
    if any(s.is_codebook and _group_statistics(recipe, [n]) for n, s in outside.items()):
        raise ValueError(f"{', '.join(outside)} lie outside the decoder blocks, where a calibrated method gets no "
                         "statistics, and a codebook scheme has no data-free fallback; keep them in float (--skip)")
    if Statistic.FISHER in needed and source_of(model) is not None:
        raise ValueError(f"{recipe.method}'s Fisher information takes gradients through the whole model, which a "
                         "streamed job (--work-dir) never holds; run it without --work-dir")
    fisher = _fisher(model, recipe, calib, plan, arch, report, progress) if Statistic.FISHER in needed else None
    was_training = model.training
    model.eval()
    lazy = source_of(model) is not None
    done = store.done() if store is not None else 0
    outer = list(arch.embed)  # what runs before block 0: all that capturing its inputs reads
    try:
        for name in outer if lazy else ():
            materialize(model, name, mapped=True)  # a lookup reads only the rows of the calibration tokens
        if calib.shape[0] < slices.count:
            raise ValueError(f"{calib.shape[0]} calibration windows cannot be cut into {slices.count} reduction slices")
        captured = [capture_block_inputs(model, blocks, calib[lo:hi], batch_size)
                    for lo, hi in (slices.bounds(k, calib.shape[0]) for k in slices.mine())]
        hiddens, block_args = [h for h, _ in captured], [a for _, a in captured]
        del captured
        # The embedding (Gemma 3's is 671 MB in float32) is not read again until the model runs.
        page_out(p for n, p in model.named_parameters() if not n.startswith(arch.blocks + "."))
        for name in outer if lazy else ():
            release(model.get_submodule(name))
        if store is not None:  # on disk, and on resume the stored inputs of the first unfinished block
            hiddens = [store.activations(hiddens[0], done)]
        for i, block in enumerate(tqdm(blocks, desc=f"quantize ({report.method})", unit="block",
                                       disable=not progress)):
            block_start = time.perf_counter()
            prefix = f"{arch.blocks}.{i}."
            if i < done:  # finished by an earlier run of this job
                _restore_report(report, store.block_meta(i)[1])
                release(block)
                continue
            materialize(model, prefix[:-1])
            # a mapped model's float weights are paged out after the block; a lazy model's are on the
            # heap and go as each linear is swapped for its quantized form, unless held here
            replaced = [] if lazy else [block.get_submodule(local).weight.data for local in plan[i]]
            elsewhere = device.type != "cpu"  # on the CPU nothing moves
            if elsewhere:
                block.to(device)
            args = [to_device(a[i], device) if elsewhere else a[i] for a in block_args]
            stats = None
            if scalings:
                prevs = [prev for prev, _ in arch.scaling_groups]
                stats = _statistics(block, list(plan[i]), hiddens, args, batch_size, slices,
                                    watch=prevs, hessian=Statistic.HESSIAN in needed, holdout_every=holdout_every)
                _apply_scales(block, arch, plan[i], stats, scalings, prefix, report)
            for group in _groups(plan[i], arch, true_sequential):
                reads = _group_statistics(recipe, [prefix + local for local in group])
                if reads and (stats is None or true_sequential):
                    stats = _statistics(block, group, hiddens, args, batch_size, slices,
                                        hessian=Statistic.HESSIAN in reads, holdout_every=holdout_every)
                    return_freed_heap()  # the forward passes' freed batches, before the solves' [in, in] buffers
                _quantize_group(block, group, plan[i], stats if reads else None, recipe, prefix, report, slices,
                                fisher)
            if i + 1 < len(blocks):  # the quantized block's outputs are the next block's inputs
                if store is not None:
                    hiddens = [store.next_activations(i, hiddens[0])]
                for hidden, slice_args in zip(hiddens, args):
                    run_block(block, hidden, slice_args, batch_size, write_back=True)
            if elsewhere:  # the quantized block comes back to be saved or kept: one block at a time on the device
                block.to("cpu")
            del args
            page_out(replaced)  # the float weights are gone from the model: so are their pages
            del replaced
            report.block_seconds.append(time.perf_counter() - block_start)
            if store is not None:
                store.save(i, block, prefix, _block_report(report, prefix))
                release(block)
            return_freed_heap()
        del hiddens
        for name in outside if lazy else ():
            materialize(model, name)
        _quantize_outside(model, outside, recipe, report, device)
    finally:
        model.train(was_training)


def _statistics(block: nn.Module, linears: list[str], hiddens: list[Tensor], args: list[dict], batch_size: int,
                slices: Slices, **collect: Any) -> BlockStatistics:
    """``collect_block_statistics`` over every window, slice by slice, folded in slice order
    (``lowbit.pipeline.distributed``): this process's slices first, then, among ranks, every rank's
    in rank order. One slice in one process is the plain batch-by-batch sum."""
    total, n = None, 0
    for hidden, slice_args in zip(hiddens, args):
        st = collect_block_statistics(block, linears, hidden, slice_args, batch_size, **collect)
        m = hidden.shape[0] * hidden.shape[1]
        total, n = (st, m) if total is None else (fold_block_statistics(total, n, st, m), n + m)
    if not slices.distributed:
        return total
    counts = gather_tensors([torch.tensor([n])], "exchanging token counts")
    per_rank = gather_tensors(statistics_tensors(total), "exchanging statistics")
    folded, n = with_tensors(total, per_rank[0]), int(counts[0][0])
    for r in range(1, slices.world):
        folded = fold_block_statistics(folded, n, with_tensors(total, per_rank[r]), int(counts[r][0]))
        n += int(counts[r][0])
    return folded


def _block_report(report: QuantizeReport, prefix: str) -> dict[str, Any]:
    """What ``report`` says of the block named ``prefix``, as plain data for its ``BlockStore`` entry."""
    mine = [n for n in report.layers if n.startswith(prefix)]
    return {"layers": {n: report.layers[n].to_dict() for n in mine},
            "method_of": {n: report.method_of[n] for n in mine},
            "chosen": {n: report.chosen[n].to_dict() for n in mine if n in report.chosen},
            "layer_seconds": {n: report.layer_seconds[n] for n in mine},
            "details": {n: d for n, d in report.details.items() if n.startswith(prefix)},
            "block_seconds": report.block_seconds[-1]}


def _restore_report(report: QuantizeReport, entry: dict[str, Any]) -> None:
    """Put a stored block's ``_block_report`` back into ``report``."""
    report.layers.update({n: QuantScheme.from_dict(d) for n, d in entry["layers"].items()})
    report.method_of.update(entry["method_of"])
    report.chosen.update({n: MethodChoice.from_dict(d) for n, d in entry.get("chosen", {}).items()})
    report.layer_seconds.update(entry["layer_seconds"])
    report.details.update(entry["details"])
    report.block_seconds.append(entry["block_seconds"])


def _quantize_group(block: nn.Module, group: list[str], selected: dict[str, QuantScheme],
                    stats: BlockStatistics | None, recipe: Recipe, prefix: str, report: QuantizeReport,
                    slices: Slices, fisher: dict[str, Tensor] | None = None) -> None:
    """Quantize ``group``'s linears of ``block`` and swap them for ``QuantLinear``s: one ``solve``
    per shared input, scheme and method (``_how``: an override's, the recipe's, or the held-out
    choice), or one linear at a time without statistics; among ranks the solves are dealt out and
    their results shared (``distributed.shared_solves``). ``fisher`` (full name -> ``[out, in]``):
    each solved linear's is handed to a method that declares it (its rows stacked as the weights
    are) and dropped from the dict."""
    if stats is None:
        runs = [[local] for local in group]
        sets: list[InputStatistics | None] = [None for _ in runs]
    else:
        runs, sets = [], []
        for st in stats.sets:
            for same in _by_scheme_and_method([m for m in st.members if m in group], selected, recipe, prefix):
                runs.append(same)
                sets.append(st)
    inputs = [{} if st is None else _method_inputs(st) for st in sets]
    if fisher is not None:  # collected on the CPU over the whole model: to the block's device
        device = linear_weight(block.get_submodule(group[0])).device
        stacked = [torch.cat([fisher.pop(prefix + local) for local in same]).to(device) for same in runs]
        inputs = [dict(statistics, fisher=f) if Statistic.FISHER in _group_statistics(recipe, [prefix + same[0]])
                  else statistics for same, statistics, f in zip(runs, inputs, stacked)]

    def job(same: list[str], statistics: dict[str, Tensor], st: InputStatistics | None
            ) -> tuple[list[QuantizedWeight], QuantizeReport]:
        scratch = QuantizeReport(method=report.method)
        how = _how(recipe, prefix + same[0])
        if how is None:
            return _choose_on_heldout(block, same, statistics, st.H_held, selected[same[0]], recipe, prefix,
                                      scratch), scratch
        return _quantize_with_statistics(block, same, statistics, selected[same[0]], get_method(how.method),
                                         how.config, prefix, scratch), scratch

    jobs = [lambda same=same, statistics=statistics, st=st: job(same, statistics, st)
            for same, statistics, st in zip(runs, inputs, sets)]
    for same, (qws, scratch) in zip(runs, shared_solves(jobs, slices, f"the solves of {prefix[:-1]}")):
        report.layers.update(scratch.layers)
        report.method_of.update(scratch.method_of)
        report.layer_seconds.update(scratch.layer_seconds)
        report.chosen.update(scratch.chosen)
        for name, d in scratch.details.items():
            report.details.setdefault(name, {}).update(d)
        report.warnings += scratch.warnings
        for local, qw in zip(same, qws):
            set_submodule(block, local, QuantLinear.from_quantized(qw, block.get_submodule(local).bias))


def _choose_on_heldout(block: nn.Module, members: list[str], statistics: dict[str, Tensor], H_held: Tensor,
                       scheme: QuantScheme, recipe: Recipe, prefix: str, report: QuantizeReport
                       ) -> list[QuantizedWeight]:
    """Each of ``members`` (linears sharing one input and ``scheme``) gets the candidate of the recipe's
    held-out choice with the smallest error on ``H_held`` (``lowbit.pipeline.holdout``), all fitted on
    ``statistics`` (the fitting windows'); choice and errors go to ``report``."""
    start = time.perf_counter()
    names = [prefix + local for local in members]
    weights = [linear_weight(block.get_submodule(local)) for local in members]
    candidates = list(dict.fromkeys([MethodChoice(recipe.method, recipe.method_config), *recipe.holdout.candidates]))
    labels = [c.label for c in candidates]

    def solve(k: int) -> list[QuantizedWeight]:
        c = candidates[k]
        return _record_warnings(report, get_method(c.method).solve, weights, scheme, c.config, statistics, names)

    choices = choose_on_heldout(weights, H_held, labels, solve)
    seconds = (time.perf_counter() - start) / len(members)
    for name, choice in zip(names, choices):
        report.layers[name] = scheme
        report.method_of[name] = candidates[choice.index].method
        report.chosen[name] = candidates[choice.index]
        report.layer_seconds[name] = seconds
        report.details.setdefault(name, {})["holdout"] = choice.to_dict()
    return [c.qweight for c in choices]


def _method_inputs(st: InputStatistics) -> dict[str, Tensor]:
    """The ``lowbit.methods.registry.InputStatistics`` mapping of the pipeline's statistics of one input."""
    values = {"absmean": st.absmean, "absmax": st.absmax}
    if st.H is not None:
        values["hessian"] = st.H
    return values


def _check_arguments(calib: Tensor | None, batch_size: int, needed: frozenset[Statistic], recipe: Recipe,
                     slices: Slices) -> None:
    """Validate the call before any work."""
    if calib is None:
        raise ValueError(f"method {recipe.describe_method()!r} needs calibration data; pass --calib PATH "
                         "(default: WikiText-2 valid from ../shared/data)")
    if not isinstance(calib, Tensor) or calib.dim() != 2 or calib.dtype != torch.long or calib.numel() == 0:
        what = f"{calib.dtype} {tuple(calib.shape)}" if isinstance(calib, Tensor) else type(calib).__name__
        raise ValueError(f"calib must be int64 token ids [samples, seqlen] (see calibration_windows), got {what}")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    uncollected = sorted(s.value for s in needed - {Statistic.HESSIAN, Statistic.INPUT_MAGNITUDES, Statistic.FISHER})
    if uncollected:
        raise ValueError(f"{recipe.describe_method()!r} needs statistics the pipeline does not collect yet: "
                         f"{', '.join(uncollected)}")
    scalings = [s.name for s in recipe.transforms if get_transform(s.name).kind is TransformKind.CHANNEL_SCALING]
    if recipe.holdout is not None and Statistic.FISHER in needed:
        raise ValueError("the Fisher is computed over every calibration window, so no window is held out from it; "
                         "drop the recipe's holdout or the Fisher-weighted method")
    if recipe.holdout is not None and slices.count > 1:
        raise ValueError("a held-out choice counts calibration windows in one slice; run it in one process "
                         "without reduction slices")
    if recipe.holdout is not None and calib.shape[0] < recipe.holdout.every:
        raise ValueError(f"holding out every {recipe.holdout.every}th window of {calib.shape[0]} leaves none held "
                         f"out; use at least {recipe.holdout.every} --calib-samples or a smaller holdout")
    if Statistic.FISHER in needed and scalings:
        raise ValueError(f"{recipe.method} weighs each weight by its Fisher, computed on the float model before "
                         f"any scale is folded in; it does not compose with {', '.join(scalings)} (drop the transform)")


def _fisher(model: nn.Module, recipe: Recipe, calib: Tensor, plan: list[dict[str, QuantScheme]], arch: Architecture,
            report: QuantizeReport, progress: bool) -> dict[str, Tensor]:
    """The Fisher of every planned linear in the blocks, on the first ``fisher_samples`` calibration windows
    of the method's config (0 or absent: all); time and window count go to ``report``."""
    samples = getattr(recipe.method_config, "fisher_samples", 0) or calib.shape[0]
    names = [f"{arch.blocks}.{i}.{local}" for i, selected in enumerate(plan) for local in selected]
    result = collect_fisher(model, calib[:samples], names, progress=progress)
    report.fisher_seconds, report.fisher_windows = result.seconds, result.windows
    return result.fisher


def _check_enough_tokens(calib: Tensor, model: nn.Module, plan: list[dict[str, QuantScheme]],
                         arch: Architecture, holdout_every: int = 0) -> None:
    """A Hessian from fewer tokens than inputs is singular: refuse before any work (with a held-out
    choice, the fitting windows' tokens count)."""
    blocks = arch.block_list(model)
    widest = max(((linear_weight(blocks[i].get_submodule(local)).shape[1], f"{arch.blocks}.{i}.{local}")
                  for i, selected in enumerate(plan) for local in selected), key=lambda t: t[0], default=(0, ""))
    tokens = calib.numel()
    if holdout_every:
        tokens = sum(not is_held_out(w, holdout_every) for w in range(calib.shape[0])) * calib.shape[1]
    if tokens < widest[0]:
        held = " fitting (not held out)" if holdout_every else ""
        raise ValueError(f"calibration has {tokens}{held} tokens, fewer than the {widest[0]} inputs of {widest[1]}, "
                         "so its statistics would be singular; use more --calib-samples or a longer --calib-seqlen "
                         f"(at least {widest[0]} tokens; 128 x 512 is the usual choice)")


def _scheme_of(recipe: Recipe, name: str, module: nn.Module, report: QuantizeReport) -> QuantScheme | None:
    """The linear's scheme after the recipe's ``group_fallback`` (whose substitutions are warned and
    go to ``report.warnings``); None, recorded in ``report.kept_float``, keeps it in float."""
    shape = tuple(linear_weight(module).shape)
    scheme, note = recipe.scheme_for_layer(name, shape[1])
    if scheme is not None and scheme.is_codebook:
        try:
            WeightLayout(scheme, shape)  # a vector or codebook that does not fit: refused before any work
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
    if note is not None:
        warnings.warn(note, stacklevel=5)
        report.warnings.append(note)
    if scheme is None:
        report.kept_float.append(name)
    return scheme


def _plan(model: nn.Module, arch: Architecture, recipe: Recipe,
          report: QuantizeReport) -> tuple[list[dict[str, QuantScheme]], dict[str, QuantScheme]]:
    """Per block, ``{local name: scheme}`` of its selected linears; and the selected linears outside
    the blocks. Fails before any work when the recipe selects nothing or a scheme cannot fit a layer."""
    plan: list[dict[str, QuantScheme]] = []
    for i, block in enumerate(arch.block_list(model)):
        plan.append({})
        for local, module in block.named_modules():
            if is_linear(module):
                scheme = _scheme_of(recipe, f"{arch.blocks}.{i}.{local}", module, report)
                if scheme is not None:
                    plan[i][local] = scheme
    prefix = arch.blocks + "."
    outside = {}
    for name, module in model.named_modules():
        if is_linear(module) and not name.startswith(prefix):
            scheme = _scheme_of(recipe, name, module, report)
            if scheme is not None:
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


def _apply_scales(block: nn.Module, arch: Architecture, selected: dict[str, QuantScheme], stats: BlockStatistics,
                  scalings: Sequence[TransformStep], prefix: str, report: QuantizeReport) -> None:
    """The recipe's channel-scaling transforms, in order, for each of the architecture's scaling
    groups, folded into the block; what each chose goes to ``report.details`` under the op.

    A group is scaled only when the fold is exact: its consumers are all selected with one scheme
    and share one input, and ``prev`` is a norm whose output tensor is that input (checked during
    the forward) or a linear with as many outputs as the consumers have inputs (not so for v_proj
    -> o_proj under grouped-query attention). The statistics of a scaled input are rescaled in place.
    """
    for prev, consumers in arch.scaling_groups:
        st = stats.set_of(consumers[0])
        if st is None or any(c not in selected or c not in st.members for c in consumers):
            continue
        if len({selected[c] for c in consumers}) > 1:
            continue
        try:
            prev_module = block.get_submodule(prev)
        except AttributeError:
            continue
        if is_linear(prev_module):
            if linear_weight(prev_module).shape[0] != st.absmax.shape[0]:
                continue
        elif not set(consumers) <= stats.fed_by.get(prev, set()):
            continue
        for step in scalings:
            weights = [linear_weight(block.get_submodule(c)) for c in consumers]
            found = get_transform(step.name).apply(weights, selected[consumers[0]], step.config, _method_inputs(st))
            report.details.setdefault(prefix + prev, {})[step.name] = {"folded": found.scale is not None,
                                                                       **found.details}
            if found.scale is None:
                continue
            fold_input_scale(prev_module, [block.get_submodule(c) for c in consumers], found.scale,
                             norm_weight_offset=arch.norm_weight_offset)
            st.rescale_inputs(1.0 / found.scale)


def _by_scheme_and_method(members: list[str], schemes: dict[str, QuantScheme], recipe: Recipe,
                          prefix: str) -> list[list[str]]:
    """Split linears that share a Hessian into runs of equal scheme and method (a recipe may give
    q_proj another of either)."""
    runs: dict[tuple[QuantScheme, MethodChoice | None], list[str]] = {}
    for local in members:
        runs.setdefault((schemes[local], _how(recipe, prefix + local)), []).append(local)
    return list(runs.values())


def _record_warnings(report: QuantizeReport, fn, *args, **kwargs):
    """Call ``fn``, keeping the message of every warning it raises in ``report`` and still showing it."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn(*args, **kwargs)
    for w in caught:
        report.warnings.append(str(w.message))
        warnings.warn(w.message, w.category, stacklevel=4)
    return result


def _quantize_with_statistics(block: nn.Module, members: list[str], statistics: dict[str, Tensor],
                              scheme: QuantScheme, method: Method, config: Any, prefix: str,
                              report: QuantizeReport) -> list[QuantizedWeight]:
    """``method.solve`` for linears of one block that share an input (its ``statistics``) and
    ``scheme``; records them in ``report``."""
    start = time.perf_counter()
    names = [prefix + local for local in members]
    weights = [linear_weight(block.get_submodule(local)) for local in members]
    qws = _record_warnings(report, method.solve, weights, scheme, config, statistics, names)
    seconds = (time.perf_counter() - start) / len(members)
    for name in names:
        report.layers[name] = scheme
        report.method_of[name] = method.name
        report.layer_seconds[name] = seconds
    return qws


def _quantize_layer(module: nn.Module, scheme: QuantScheme, method: Method, config: Any, name: str,
                    report: QuantizeReport, device: torch.device) -> QuantizedWeight:
    """One linear's ``QuantizedWeight`` without statistics, solved on ``device`` and returned on the
    weight's device; records scheme, time and warnings."""
    start = time.perf_counter()
    weight = linear_weight(module)
    qw = _record_warnings(report, method.solve, [weight.to(device)], scheme, config, {}, [name])[0].to(weight.device)
    report.layers[name] = scheme
    report.method_of[name] = method.name
    report.layer_seconds[name] = time.perf_counter() - start
    return qw


def _quantize_outside(model: nn.Module, outside: dict[str, QuantScheme], recipe: Recipe,
                      report: QuantizeReport, device: torch.device) -> None:
    """Selected linears outside the blocks: no block input was captured for them, so they get their
    method when it needs no statistics, else RTN (also where the held-out choice would decide)."""
    if not outside:
        return
    rtn = MethodChoice("rtn")
    hows = {name: recipe.method_for(name) for name in outside}
    hows = {name: how if not get_method(how.method).calibrated and _how(recipe, name) is not None else rtn
            for name, how in hows.items()}
    calibrated = [name for name in outside if _group_statistics(recipe, [name])]
    if calibrated:
        warnings.warn(f"{len(calibrated)} selected linear layers lie outside the decoder blocks and get rtn "
                      f"(no calibration statistics): {', '.join(calibrated)}; add them to the recipe's skip to keep "
                      "them in float", stacklevel=4)
    for name, scheme in outside.items():
        module = model.get_submodule(name)
        how = hows[name]
        qw = _quantize_layer(module, scheme, get_method(how.method), how.config, name, report, device)
        set_submodule(model, name, QuantLinear.from_quantized(qw, module.bias))

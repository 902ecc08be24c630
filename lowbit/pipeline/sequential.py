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
Hessians, and one batch's intermediate activations. A block's float weights leave memory once it
is quantized, also when they are pages of a memory-mapped checkpoint (``lowbit.memory``), and so
do the embedding's once block 0's inputs are captured: of the float model, only the block being
quantized is resident. Everything runs on CPU in float32 unless the
model is in another dtype (activations are stored in float32 and cast to the model's dtype).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from lowbit.evaluate.speed import peak_rss_bytes
from lowbit.memory import page_out, return_freed_heap
from lowbit.methods import get_method
from lowbit.methods.awq import AWQConfig, awq_quantize, search_scales
from lowbit.methods.gptq import GPTQConfig, gptq_quantize_shared
from lowbit.methods.smoothquant import SmoothQuantConfig, smoothing_scales
from lowbit.nn import QuantLinear, fold_input_scale, set_submodule
from lowbit.pipeline.activations import ActivationReport
from lowbit.pipeline.architectures import Architecture, architecture_for
from lowbit.pipeline.recipe import Recipe
from lowbit.pipeline.statistics import BlockStatistics, capture_block_inputs, collect_block_statistics, run_block
from lowbit.qweight import QuantizedWeight
from lowbit.scheme import QuantScheme


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
        awq_exponents: per op that AWQ considered folding a scale into (full name), the exponent
            chosen, or None when no scaling beat plain rounding.
        smoothed: the ops SmoothQuant folded its scales into (full names).
        warnings: messages of every warning raised while quantizing (GPTQ dampening retries,
            group-size fallbacks).
        seconds: total wall time, capture included.
        peak_rss_bytes: the process's peak resident memory when the job ended (a high-water mark
            of the whole process, not only of this call).
        activations: set by ``lowbit.api.quantize`` when the recipe quantizes activations too.
    """

    method: str
    layers: dict[str, QuantScheme] = field(default_factory=dict)
    layer_seconds: dict[str, float] = field(default_factory=dict)
    method_of: dict[str, str] = field(default_factory=dict)
    kept_float: list[str] = field(default_factory=list)
    block_seconds: list[float] = field(default_factory=list)
    awq_exponents: dict[str, float | None] = field(default_factory=dict)
    smoothed: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    activations: ActivationReport | None = None


def is_linear(module: nn.Module) -> bool:
    """A layer the pipeline can quantize: ``nn.Linear`` or transformers' ``Conv1D`` (GPT-2)."""
    return isinstance(module, (nn.Linear, Conv1D))


def linear_weight(module: nn.Module) -> Tensor:
    """The weight of a linear layer as ``[out_features, in_features]`` (``Conv1D`` stores ``[in, out]``)."""
    return module.weight.data.T if isinstance(module, Conv1D) else module.weight.data


@dataclass(frozen=True)
class MethodPlan:
    """What a method name means to the pipeline: ``[awq+|smoothquant+]solver``.

    ``scales``: None, ``"awq"`` (search AWQ input scales) or ``"smoothquant"`` (SmoothQuant's
    outlier-migrating scales), folded in before quantizing. ``solver``: ``"gptq"``, ``"awq"`` (AWQ's
    clipping search, then rounding) or a data-free registry method (``"rtn"``, ``"hqq"``) that
    ignores the statistics. ``smoothquant`` alone means ``smoothquant+rtn``.
    """

    scales: str | None
    solver: str

    @classmethod
    def parse(cls, method: str) -> MethodPlan:
        parts = method.split("+")
        if len(parts) == 2 and parts[0] in SCALE_SEARCHES:
            scales, solver = parts
        elif method == "smoothquant":
            scales, solver = "smoothquant", "rtn"
        elif len(parts) == 1:
            scales, solver = ("awq" if method == "awq" else None), method
        else:
            raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHOD_NAMES)}")
        if solver not in CALIBRATED_SOLVERS:
            try:
                get_method(solver)
            except ValueError:
                raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHOD_NAMES)}") from None
        return cls(scales, solver)

    @property
    def needs_statistics(self) -> bool:
        return self.scales is not None or self.solver in CALIBRATED_SOLVERS

    @property
    def needs_hessian(self) -> bool:
        """SmoothQuant needs only activation maxima; AWQ and GPTQ need ``H = 2 X^T X / n``."""
        return self.scales == "awq" or self.solver in CALIBRATED_SOLVERS


CALIBRATED_SOLVERS = ("gptq", "awq")
SCALE_SEARCHES = ("awq", "smoothquant")
METHOD_NAMES = ("rtn", "hqq", "gptq", "awq", "awq+gptq", "awq+rtn", "awq+hqq", "smoothquant", "smoothquant+rtn",
                "smoothquant+gptq")


@torch.no_grad()
def quantize_sequential(model: nn.Module, recipe: Recipe, calib: Tensor, *, method: str = "gptq",
                        gptq: GPTQConfig = GPTQConfig(), awq: AWQConfig = AWQConfig(),
                        smoothquant: SmoothQuantConfig = SmoothQuantConfig(), true_sequential: bool = False,
                        batch_size: int = 4, progress: bool = True) -> SequentialReport:
    """Quantize ``model`` in place, block by block, on calibration windows ``calib``.

    Args:
        model: a Hugging Face causal LM whose ``config.model_type`` is in ``ARCHITECTURES``.
        recipe: which scheme each linear gets (``recipe.scheme_for_layer``; None keeps float).
        calib: int64 token ids ``[samples, seqlen]`` (``calibration_windows``).
        method: ``"gptq"``, ``"awq"`` (scales, clipping, rounding), ``"awq+gptq"`` (AWQ's scales
            folded in, then GPTQ), ``"smoothquant+gptq"`` / ``"smoothquant"`` (SmoothQuant's scales
            folded in, then GPTQ / RTN), or a data-free registry method (``"rtn"``, ``"hqq"``,
            optionally after AWQ's scales: ``"awq+hqq"``), which then gets the same plumbing.
        gptq: GPTQ's knobs (dampening, act order, block size).
        awq: AWQ's knobs (grids of the scale and clipping searches).
        smoothquant: SmoothQuant's migration strength (``method="smoothquant[+solver]"``).
        true_sequential: quantize a block's linears group by group (``Architecture.sequential_groups``)
            so each group's statistics come from inputs that went through the quantized groups
            before it. AWQ's scales are still searched on the float block, before any rounding.
        batch_size: windows per forward pass; changes memory and speed, not the result beyond
            float rounding. On SmolLM2 at 128 x 512 tokens, 4 instead of 8 took the peak RSS
            from 1069 to 794 MiB in the same time (attention and MLP intermediates of a batch).
        progress: show a progress bar over blocks.

    Linears outside the decoder blocks that the recipe selects (``lm_head`` when not skipped, OPT's
    ``project_in``/``project_out``, a vision tower) are quantized with RTN, with a warning, and
    listed in ``report.method_of``.

    Raises:
        ValueError: unsupported architecture, bad ``calib``/``batch_size``/``method``, a recipe that
            selects no linear, a group size that does not divide a layer (unless the recipe's
            ``group_fallback`` says otherwise), fewer calibration tokens than a layer has inputs,
            or a GPTQ failure (naming the layer).
    """
    start = time.perf_counter()
    arch = architecture_for(model)
    blocks = arch.block_list(model)
    plan_method = _check_arguments(calib, batch_size, method)
    report = SequentialReport(method=method)
    plan, outside = _plan(model, arch, recipe, report)
    _check_enough_tokens(calib, model, plan, arch, plan_method)
    was_training = model.training
    model.eval()
    try:
        hidden, block_args = capture_block_inputs(model, blocks, calib, batch_size)
        # The embedding (Gemma 3's is 671 MB in float32) is not read again until the model runs.
        page_out(p for n, p in model.named_parameters() if not n.startswith(arch.blocks + "."))
        for i, block in enumerate(tqdm(blocks, desc=f"quantize ({method})", unit="block", disable=not progress)):
            block_start = time.perf_counter()
            prefix = f"{arch.blocks}.{i}."
            replaced = [block.get_submodule(local).weight for local in plan[i]]
            stats = None
            if plan_method.scales:
                prevs = [prev for prev, _ in arch.scaling_groups]
                stats = collect_block_statistics(block, list(plan[i]), hidden, block_args[i], batch_size, watch=prevs,
                                                 hessian=plan_method.needs_hessian)
                _apply_scales(block, arch, plan[i], stats, plan_method.scales, awq, smoothquant, prefix, report)
            for group in _groups(plan[i], arch, true_sequential):
                if plan_method.solver not in CALIBRATED_SOLVERS:
                    for local in group:
                        qw = _quantize_layer(block.get_submodule(local), plan[i][local], get_method(plan_method.solver),
                                             prefix + local, report)
                        set_submodule(block, local, QuantLinear.from_quantized(qw, block.get_submodule(local).bias))
                    continue
                if stats is None or true_sequential:
                    stats = collect_block_statistics(block, group, hidden, block_args[i], batch_size)
                for st in stats.sets:
                    members = [m for m in st.members if m in group]
                    for same in _by_scheme(members, plan[i]):
                        qws = _quantize_with_statistics(block, same, st.H, plan[i][same[0]], plan_method.solver,
                                                        gptq, awq, prefix, report)
                        for local, qw in zip(same, qws):
                            set_submodule(block, local, QuantLinear.from_quantized(qw, block.get_submodule(local).bias))
            if i + 1 < len(blocks):  # the quantized block's outputs are the next block's inputs
                run_block(block, hidden, block_args[i], batch_size, write_back=True)
            page_out(replaced)  # the float weights are gone from the model: so are their pages
            del replaced
            return_freed_heap()
            report.block_seconds.append(time.perf_counter() - block_start)
        del hidden
        _quantize_outside(model, outside, report)
    finally:
        model.train(was_training)
    report.seconds = time.perf_counter() - start
    report.peak_rss_bytes = peak_rss_bytes()
    return report


def _check_arguments(calib: Tensor, batch_size: int, method: str) -> MethodPlan:
    """Validate the call; return what ``method`` means."""
    if not isinstance(calib, Tensor) or calib.dim() != 2 or calib.dtype != torch.long or calib.numel() == 0:
        what = f"{calib.dtype} {tuple(calib.shape)}" if isinstance(calib, Tensor) else type(calib).__name__
        raise ValueError(f"calib must be int64 token ids [samples, seqlen] (see calibration_windows), got {what}")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    return MethodPlan.parse(method)


def _check_enough_tokens(calib: Tensor, model: nn.Module, plan: list[dict[str, QuantScheme]], arch: Architecture,
                         plan_method: MethodPlan) -> None:
    """A Hessian from fewer tokens than inputs is singular: refuse before any work."""
    if not plan_method.needs_hessian:
        return
    blocks = arch.block_list(model)
    widest = max(((linear_weight(blocks[i].get_submodule(local)).shape[1], f"{arch.blocks}.{i}.{local}")
                  for i, selected in enumerate(plan) for local in selected), key=lambda t: t[0], default=(0, ""))
    if calib.numel() < widest[0]:
        raise ValueError(f"calibration has {calib.numel()} tokens, fewer than the {widest[0]} inputs of {widest[1]}, "
                         "so its statistics would be singular; use more --calib-samples or a longer --calib-seqlen "
                         f"(at least {widest[0]} tokens; 128 x 512 is the usual choice)")


def _plan(model: nn.Module, arch: Architecture, recipe: Recipe,
          report: SequentialReport) -> tuple[list[dict[str, QuantScheme]], dict[str, QuantScheme]]:
    """Per block, ``{local name: scheme}`` of its selected linears; and the selected linears outside
    the blocks. Fails before any work when the recipe selects nothing or a scheme cannot fit a layer
    (after the recipe's ``group_fallback``, whose substitutions go to ``report.warnings``)."""

    def scheme_of(name: str, module: nn.Module) -> QuantScheme | None:
        scheme, note = recipe.scheme_for_layer(name, linear_weight(module).shape[1])
        if note is not None:
            warnings.warn(note, stacklevel=4)
            report.warnings.append(note)
        if scheme is None:
            report.kept_float.append(name)
        return scheme

    plan: list[dict[str, QuantScheme]] = []
    for i, block in enumerate(arch.block_list(model)):
        plan.append({})
        for local, module in block.named_modules():
            if is_linear(module):
                scheme = scheme_of(f"{arch.blocks}.{i}.{local}", module)
                if scheme is not None:
                    plan[i][local] = scheme
    prefix = arch.blocks + "."
    outside = {}
    for name, module in model.named_modules():
        if is_linear(module) and not name.startswith(prefix):
            scheme = scheme_of(name, module)
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
                  kind: str, awq: AWQConfig, smoothquant: SmoothQuantConfig, prefix: str,
                  report: SequentialReport) -> None:
    """AWQ's scale search (``kind="awq"``) or SmoothQuant's scales for each of the architecture's
    scaling groups, folded into the block.

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
        weights = [linear_weight(block.get_submodule(c)) for c in consumers]
        if kind == "awq":
            found = search_scales(weights, st.H, st.absmean, selected[consumers[0]], awq)
            report.awq_exponents[prefix + prev] = found.exponent
            if found.exponent is None:
                continue
            scale = found.scale
        else:
            scale = smoothing_scales(st.absmax, weights, smoothquant.alpha)
            report.smoothed.append(prefix + prev)
        fold_input_scale(prev_module, [block.get_submodule(c) for c in consumers], scale,
                         norm_weight_offset=arch.norm_weight_offset)
        st.rescale_inputs(1.0 / scale)


def _by_scheme(members: list[str], schemes: dict[str, QuantScheme]) -> list[list[str]]:
    """Split linears that share a Hessian into runs of equal scheme (a recipe may give q_proj another)."""
    runs: dict[QuantScheme, list[str]] = {}
    for local in members:
        runs.setdefault(schemes[local], []).append(local)
    return list(runs.values())


def _record_warnings(report: SequentialReport, fn, *args, **kwargs):
    """Call ``fn``, keeping the message of every warning it raises in ``report`` and still showing it."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn(*args, **kwargs)
    for w in caught:
        report.warnings.append(str(w.message))
        warnings.warn(w.message, w.category, stacklevel=4)
    return result


def _quantize_with_statistics(block: nn.Module, members: list[str], H: Tensor, scheme: QuantScheme, solver: str,
                              gptq: GPTQConfig, awq: AWQConfig, prefix: str,
                              report: SequentialReport) -> list[QuantizedWeight]:
    """GPTQ (one solve) or AWQ clipping (per linear) for linears of one block that share ``H`` and
    ``scheme``; records them in ``report``."""
    start = time.perf_counter()
    names = [prefix + local for local in members]
    weights = [linear_weight(block.get_submodule(local)) for local in members]
    if solver == "gptq":
        qws = _record_warnings(report, gptq_quantize_shared, weights, H, scheme, gptq, layers=names)
    else:
        qws = [_record_warnings(report, awq_quantize, w, H, scheme, awq, layer=name) for w, name in zip(weights, names)]
    seconds = (time.perf_counter() - start) / len(members)
    for name in names:
        report.layers[name] = scheme
        report.method_of[name] = report.method
        report.layer_seconds[name] = seconds
    return qws


def _quantize_layer(module: nn.Module, scheme: QuantScheme, quantize_weight, name: str,
                    report: SequentialReport) -> QuantizedWeight:
    """One linear's ``QuantizedWeight`` by a data-free method; records scheme, time and warnings."""
    start = time.perf_counter()
    qw = _record_warnings(report, quantize_weight, linear_weight(module), scheme, layer=name)
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

"""Statistics of linear layers' inputs, collected block by block in bounded memory.

The one collector behind the sequential pipeline (Hessians and ``|x|`` moments of a block's
linears), GGUF export's ``--imatrix``/``--gptq`` statistics and the calibration of static
activation scales (histograms of each quantized linear's input):

1. ``capture_block_inputs`` runs the model on the calibration windows with every decoder block's
   ``forward`` replaced by a recorder: block 0's records its input hidden states, every block
   records the arguments the model passes it (attention mask, rotary ``position_embeddings``,
   ``position_ids`` ...; Gemma 3 passes different ones to sliding and full attention blocks), the
   last one stops the forward.
2. ``observe_inputs`` hooks a block's linears while ``run_block`` runs it over every window and
   folds each input into a record (``InputMoments``, a histogram, ...).
3. ``run_block(write_back=True)`` replaces the block's inputs by its outputs: the next block's inputs.

Sharing rule: during one forward, a linear whose input *is* (same tensor object) the input of a
linear hooked before it shares that linear's record (q/k/v, gate/up), so each input is counted
once. The sets are fixed on the first batch and checked on every later one.

Memory: one ``[samples, seqlen, hidden]`` float32 activation buffer and the records of one block.
``stream_input_statistics`` walks an unmodified model this way and hands out one block's records
at a time (then those of the selected linears outside the blocks, such as ``lm_head``), so a caller
that consumes them in turn never holds more than one block's Hessians.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lowbit.device import resolve_device, to_device
from lowbit.methods.gptq import accumulate_hessian
from lowbit.pipeline.architectures import architecture_for
from lowbit.pipeline.holdout import is_held_out

# Per block, what the model passed it besides the hidden states: (extra positional args, kwargs).
BlockArgs = tuple[tuple[Any, ...], dict[str, Any]]


class InputRecord(Protocol):
    """What ``observe_inputs`` folds each batch of one input tensor into."""

    def update(self, x: Tensor) -> None: ...


R = TypeVar("R", bound=InputRecord)


class _StopForward(Exception):
    """Raised once every input a pass needs was seen: nothing after that point is computed."""


def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, calib: Tensor,
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

    _forward_batches(model, blocks, [recorder(i) for i in range(len(blocks))], calib, batch_size, batch,
                     must_stop=True)
    assert hidden is not None  # the loop ran at least once and block 0 recorded
    return hidden, block_args


def _forward_batches(model: nn.Module, blocks: nn.ModuleList, forwards: list[Callable[..., Tensor]], calib: Tensor,
                     batch_size: int, batch: dict[str, int], *, must_stop: bool) -> None:
    """Run ``model`` over ``calib`` batch by batch with block ``i``'s forward replaced by ``forwards[i]``
    (restored afterwards), ``batch["start"]`` set to each batch's first window. A forward that raises
    ``_StopForward`` ends its batch; with ``must_stop`` a batch that runs to the end is an error."""
    for block, forward in zip(blocks, forwards):
        block.forward = forward  # an instance attribute: hooks and attributes of the block stay
    try:
        for start in range(0, calib.shape[0], batch_size):
            batch["start"] = start
            try:
                model(input_ids=calib[start:start + batch_size], use_cache=False)
            except _StopForward:
                continue
            if must_stop:
                raise RuntimeError(f"{type(model).__name__}'s forward never reached its last decoder block")
    finally:
        for block in blocks:
            del block.forward


def run_block(block: nn.Module, hidden: Tensor, args_by_size: dict[int, BlockArgs], batch_size: int, *,
              write_back: bool) -> None:
    """Run ``block`` over every window of ``hidden``, batch by batch; with ``write_back`` the outputs
    replace the inputs (each batch's output depends only on that batch's input).

    The block runs where its tensors are (``lowbit.device``): each batch goes there and its output
    comes back to ``hidden``'s device, so the activation buffer may stay on the CPU (or on disk)
    while a GPU computes; ``args_by_size`` must already be on the block's device."""
    dtype = next((p.dtype for p in block.parameters() if p.is_floating_point()), torch.float32)
    device = next(itertools.chain(block.parameters(), block.buffers()), hidden).device
    for start in range(0, hidden.shape[0], batch_size):
        x = hidden[start:start + batch_size]
        args, kwargs = args_by_size[x.shape[0]]
        out = block(x.to(device, dtype), *args, **kwargs)
        if write_back:
            out = out[0] if isinstance(out, tuple) else out
            hidden[start:start + x.shape[0]] = out.to(hidden.device)


@dataclass
class ObservedInputs:
    """What ``observe_inputs`` saw. ``sets``: per distinct input tensor, the linears that read it (in
    hook order) and its record. ``fed_by``: for each watched op, the linears that read its output
    tensor itself (so a scale folded into the op reaches exactly them)."""

    sets: list[tuple[list[str], Any]]
    fed_by: dict[str, set[str]]


class _InputObserver:
    """The sharing rule, applied by forward hooks on ``linears`` (local names inside ``root``)."""

    def __init__(self, root: nn.Module, linears: list[str], new_record: Callable[[], InputRecord],
                 watch: tuple[str, ...] | list[str] = (), prefix: str = "") -> None:
        self.linears, self.prefix = linears, prefix
        self.new_record = new_record
        self.owner: dict[str, str] = {}  # linear -> the linear whose record it shares (itself when first)
        self.records: dict[str, InputRecord] = {}  # first linear -> its record
        self.seen: list[tuple[Tensor, str]] = []  # inputs of the linears hooked so far in this forward
        self.outputs: dict[str, Tensor] = {}  # watched op -> its output in this forward
        self.fed_by: dict[str, set[str]] = {name: set() for name in watch}
        self.handles = [root.register_forward_pre_hook(self._forget)]
        for name in watch:
            try:
                self.handles.append(root.get_submodule(name).register_forward_hook(self._keep_output(name)))
            except AttributeError:
                continue  # an op the architecture names but this block lacks: nothing to fold into
        self.handles += [root.get_submodule(local).register_forward_pre_hook(self._hook(local)) for local in linears]

    def _forget(self, module: nn.Module, args: Any) -> None:
        self.seen.clear()
        self.outputs.clear()

    def _keep_output(self, name: str):
        def keep(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            self.outputs[name] = output

        return keep

    def _hook(self, local: str):
        def add(module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            x = inputs[0]
            first = next((o for t, o in self.seen if t is x), local)
            if self.owner.setdefault(local, first) != first:
                raise RuntimeError(f"{local} read the input of {first} on one batch but not on another; "
                                   "their statistics cannot be shared")
            for name, out in self.outputs.items():
                if out is x:
                    self.fed_by[name].add(local)
            if first == local:
                try:
                    self.records.setdefault(local, self.new_record()).update(x)
                except ValueError as e:
                    raise ValueError(f"{self.prefix}{local}: {e}") from None
                self.seen.append((x, local))
            self.after(local)

        return add

    def after(self, local: str) -> None:
        """Called after each hooked linear's input was taken in; a pass may stop the forward here."""

    def result(self) -> ObservedInputs:
        members: dict[str, list[str]] = {}
        for local in self.linears:
            if local in self.owner:
                members.setdefault(self.owner[local], []).append(local)
        return ObservedInputs([(m, self.records[first]) for first, m in members.items()], self.fed_by)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.seen.clear()
        self.outputs.clear()


def observe_inputs(block: nn.Module, linears: list[str], hidden: Tensor, args_by_size: dict[int, BlockArgs],
                   batch_size: int, new_record: Callable[[], InputRecord],
                   watch: tuple[str, ...] | list[str] = (), prefix: str = "") -> ObservedInputs:
    """Run ``block`` over all calibration windows (``run_block``, no write-back) and fold the input of
    each of ``linears`` into a record made by ``new_record``, one per distinct input tensor (the
    sharing rule of the module docstring). ``watch`` names ops (norms) whose output objects are
    compared with the linears' inputs the same way; ``prefix`` (the block's name) starts the layer
    name in a record's errors."""
    observer = _InputObserver(block, linears, new_record, watch, prefix)
    try:
        run_block(block, hidden, args_by_size, batch_size, write_back=False)
    finally:
        observer.remove()
    return observer.result()


class InputMoments:
    """Running statistics of one input: ``H = 2 X^T X / n`` (when asked for), ``sum |x|``, ``max |x|``
    and ``sum x^2`` per input channel, over every token seen."""

    def __init__(self, hessian: bool) -> None:
        self.hessian = hessian
        self.H: Tensor | None = None
        self.n = 0
        self.abs_sum: Tensor | float = 0.0
        self.abs_max: Tensor | None = None
        self.sq_sum: Tensor | float = 0.0

    def update(self, x: Tensor) -> None:
        a = x.detach().float().abs().reshape(-1, x.shape[-1])
        if not torch.isfinite(a).all():
            raise ValueError("the input is not finite on the calibration text; check the model's weights "
                             "or run it in float32")
        if self.hessian:
            self.H, n = accumulate_hessian(self.H, x, self.n)
        else:
            n = self.n + a.shape[0]
        self.abs_max = a.amax(0) if self.abs_max is None else torch.maximum(self.abs_max, a.amax(0))
        self.abs_sum = a.sum(0) + self.abs_sum
        self.sq_sum = (a * a).sum(0) + self.sq_sum
        self.n = n

    @property
    def absmean(self) -> Tensor:
        """``mean |x|`` per input channel."""
        return self.abs_sum / self.n

    @property
    def sqmean(self) -> Tensor:
        """``mean x^2`` per input channel: llama.cpp's imatrix."""
        return self.sq_sum / self.n


class SplitMoments:
    """``InputMoments`` of the fitting windows (``H``, ``sqmean`` ... as ``InputMoments`` has them)
    and the Hessian of the held-out ones (``H_held``): every ``every``-th calibration window is held
    out (``lowbit.pipeline.holdout.is_held_out``). Each ``update`` is one batch ``[windows, seqlen,
    in]`` of consecutive windows, the first batch starting at window 0."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.fit = InputMoments(hessian=True)
        self.held = InputMoments(hessian=True)
        self.windows = 0

    def update(self, x: Tensor) -> None:
        if x.dim() != 3:
            raise ValueError(f"a held-out split needs inputs [windows, seqlen, in], got shape {tuple(x.shape)}")
        held = torch.tensor([is_held_out(self.windows + k, self.every) for k in range(x.shape[0])], device=x.device)
        self.windows += x.shape[0]
        if bool((~held).any()):
            self.fit.update(x[~held])
        if bool(held.any()):
            self.held.update(x[held])

    def _fitted(self) -> InputMoments:
        if self.fit.n == 0 or self.held.n == 0:
            raise ValueError(f"holding out every {self.every}th of {self.windows} calibration windows leaves no "
                             "window on one side; use more --calib-samples")
        return self.fit

    @property
    def H(self) -> Tensor:
        return self._fitted().H

    @property
    def absmean(self) -> Tensor:
        return self._fitted().absmean

    @property
    def abs_max(self) -> Tensor:
        return self._fitted().abs_max

    @property
    def sqmean(self) -> Tensor:
        return self._fitted().sqmean

    @property
    def H_held(self) -> Tensor:
        return self.held.H


@dataclass
class InputStatistics:
    """Statistics of one input tensor shared by ``members`` (q/k/v, gate/up, or a single linear).

    ``H = 2 X^T X / n`` (None when not asked for); ``absmean = mean |x|``, ``absmax = max |x|`` and
    ``sqmean = mean x^2`` (llama.cpp's imatrix) per input channel, over every calibration token;
    with a held-out split (``SplitMoments``) those are of the fitting windows' tokens and ``H_held``
    is the held-out windows' Hessian (else None).
    """

    members: list[str]
    H: Tensor | None
    absmean: Tensor
    absmax: Tensor
    sqmean: Tensor
    H_held: Tensor | None = None

    @classmethod
    def of(cls, members: list[str], moments: InputMoments | SplitMoments) -> InputStatistics:
        return cls(members, moments.H, moments.absmean, moments.abs_max, moments.sqmean,
                   moments.H_held if isinstance(moments, SplitMoments) else None)

    def rescale_inputs(self, inv: Tensor) -> None:
        """The statistics after the input was multiplied by ``inv`` per channel (a folded scale)."""
        for H in (self.H, self.H_held):
            if H is not None:
                H.mul_(inv[:, None]).mul_(inv[None, :])
        self.absmean.mul_(inv)
        self.absmax.mul_(inv)
        self.sqmean.mul_(inv * inv)


@dataclass
class BlockStatistics:
    """What one forward pass of a block over the calibration windows measured.

    ``sets``: per shared input, its statistics. ``fed_by``: as ``ObservedInputs.fed_by``.
    """

    sets: list[InputStatistics]
    fed_by: dict[str, set[str]]

    def set_of(self, local: str) -> InputStatistics | None:
        return next((st for st in self.sets if local in st.members), None)


def collect_block_statistics(block: nn.Module, linears: list[str], hidden: Tensor,
                             args_by_size: dict[int, BlockArgs], batch_size: int,
                             watch: tuple[str, ...] | list[str] = (), hessian: bool = True,
                             holdout_every: int = 0) -> BlockStatistics:
    """``observe_inputs`` with ``InputMoments``: the statistics the pipeline's methods take. Without
    ``hessian`` only the per-channel moments of ``x`` are collected. With ``holdout_every`` (>= 2)
    every such window of ``hidden`` is held out (``SplitMoments``): the statistics are the other
    windows', plus the held-out Hessian."""
    new_record = (lambda: SplitMoments(holdout_every)) if holdout_every else (lambda: InputMoments(hessian))
    seen = observe_inputs(block, linears, hidden, args_by_size, batch_size, new_record, watch)
    return BlockStatistics([InputStatistics.of(m, rec) for m, rec in seen.sets], seen.fed_by)


def fold_block_statistics(a: BlockStatistics, n_a: int, b: BlockStatistics, n_b: int) -> BlockStatistics:
    """The statistics over the windows of ``a`` (``n_a`` tokens) then those of ``b`` (``n_b``), from
    the two: means weighted by token counts, maxima of maxima, in this one fixed order
    (``lowbit.pipeline.distributed``). ``a`` is updated in place and returned; both come from the
    same block and linears, so their sets line up."""
    n = n_a + n_b
    for x, y in zip(a.sets, b.sets, strict=True):
        if x.members != y.members:
            raise RuntimeError(f"statistics of two slices disagree on which linears share an input: {x.members} "
                               f"vs {y.members}")
        if x.H is not None:
            x.H.mul_(n_a / n).add_(y.H, alpha=n_b / n)
        x.absmean = x.absmean * (n_a / n) + y.absmean * (n_b / n)
        x.sqmean = x.sqmean * (n_a / n) + y.sqmean * (n_b / n)
        x.absmax = torch.maximum(x.absmax, y.absmax)
    return a


def statistics_tensors(stats: BlockStatistics) -> list[Tensor]:
    """Every tensor of ``stats`` in a fixed order (what ranks exchange)."""
    out = []
    for st in stats.sets:
        out += ([st.H] if st.H is not None else []) + [st.absmean, st.absmax, st.sqmean]
    return out


def with_tensors(stats: BlockStatistics, tensors: list[Tensor]) -> BlockStatistics:
    """``stats``' structure holding ``tensors`` (as ``statistics_tensors`` lists them)."""
    it = iter(tensors)
    sets = [InputStatistics(st.members, next(it) if st.H is not None else None, next(it), next(it), next(it))
            for st in stats.sets]
    return BlockStatistics(sets, stats.fed_by)


class _TailObserver(_InputObserver):
    """Observes linears outside the blocks and stops the forward once all of them ran in this batch
    (``lm_head``'s product, the largest of the model, is then never computed)."""

    def __init__(self, root: nn.Module, linears: list[str], new_record: Callable[[], InputRecord]) -> None:
        self.ran: set[str] = set()
        super().__init__(root, linears, new_record)

    def after(self, local: str) -> None:
        self.ran.add(local)
        if len(self.ran) == len(self.linears):
            raise _StopForward

    def _forget(self, module: nn.Module, args: Any) -> None:
        super()._forget(module, args)
        self.ran.clear()


def _observe_outside(model: nn.Module, blocks: nn.ModuleList, outside: list[str], final: Tensor, calib: Tensor,
                     batch_size: int, new_record: Callable[[], InputRecord]) -> ObservedInputs:
    """Records of linears outside the blocks: the model runs again with its blocks replaced by one
    that returns their final outputs ``final``, so only what lies outside them is computed."""
    batch = {"start": 0}

    def last_block(hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return final[batch["start"]:batch["start"] + hidden_states.shape[0]].to(hidden_states.dtype)

    def skip(hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return hidden_states

    observer = _TailObserver(model, outside, new_record)
    try:
        _forward_batches(model, blocks, [skip] * (len(blocks) - 1) + [last_block], calib, batch_size, batch,
                         must_stop=False)
    finally:
        observer.remove()
    return observer.result()


def stream_input_statistics(model: nn.Module, calib: Tensor, select: Callable[[nn.Module], bool], *,
                            new_record: Callable[[], R], batch_size: int = 4, progress: bool = True,
                            device: torch.device | str = "cpu") -> Iterator[dict[str, R]]:
    """Walk ``model`` block by block over ``calib`` and yield, per decoder block and then once for the
    selected linears outside the blocks (skipped when there are none), ``{full module name: record}``
    of every module for which ``select`` is true, linears that share an input sharing one record.

    The model is not modified; each block runs on the previous block's outputs, so the records are
    those of the model's own forward. A record yielded for a block is not referenced afterwards:
    consume each before asking for the next to hold one block's worth at a time.

    ``device`` (``lowbit.device``): where each block runs and its records are kept (a copy of the
    block goes there, one at a time; the model itself stays where it is). The activation buffer, the
    embedding and what lies outside the blocks stay on the CPU.

    Raises:
        ValueError: unsupported architecture, bad ``calib``/``batch_size``, or an input that a
            record refuses (``InputMoments``: NaN/Inf), naming the layer.
    """
    if not isinstance(calib, Tensor) or calib.dim() != 2 or calib.dtype != torch.long or calib.numel() == 0:
        what = f"{calib.dtype} {tuple(calib.shape)}" if isinstance(calib, Tensor) else type(calib).__name__
        raise ValueError(f"calibration must be int64 token ids [samples, seqlen] (see calibration_windows), got {what}")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    device = resolve_device(device)
    arch = architecture_for(model)
    blocks = arch.block_list(model)
    prefix = arch.blocks + "."
    outside = [n for n, m in model.named_modules() if select(m) and not n.startswith(prefix)]
    # No decorator: torch.no_grad() around a generator keeps its last yielded value while computing
    # the next one (two blocks' records alive), and grad mode is not to leak into the consumer.
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            hidden, block_args = capture_block_inputs(model, blocks, calib, batch_size)
        for i, block in enumerate(tqdm(blocks, desc="calibration statistics", unit="block", disable=not progress)):
            linears = [n for n, m in block.named_modules() if select(m)]
            args = block_args[i]
            if device.type != "cpu":  # a copy: moving the block itself would leave its float weights on the heap
                block, args = copy.deepcopy(block).to(device), to_device(args, device)
            with torch.no_grad():
                seen = observe_inputs(block, linears, hidden, args, batch_size, new_record,
                                      prefix=f"{prefix}{i}.")
            yield {f"{prefix}{i}.{local}": rec for members, rec in seen.sets for local in members}
            del seen
            with torch.no_grad():
                run_block(block, hidden, args, batch_size, write_back=True)
            del block, args
        if outside:
            with torch.no_grad():
                seen = _observe_outside(model, blocks, outside, hidden, calib, batch_size, new_record)
            del hidden
            yield {name: rec for members, rec in seen.sets for name in members}
    finally:
        model.train(was_training)


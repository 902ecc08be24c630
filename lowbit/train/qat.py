"""Quantization-aware training of a quantized model against its float teacher, on a CPU in minutes.

    student, tokenizer = lowbit.load("out/gptq-int3")            # any lowbit PTQ checkpoint
    teacher, _ = lowbit.load("smollm2-135m")                     # the float model it came from
    report = train_qat(student, teacher, tokenizer, QatSettings(stages=("block", "e2e")), state_dir="out/qat-state")
    save_quantized(student, "out/qat-int3", ...)                 # QuantLinear again: exact codes

Two stages, after EfficientQAT (Chen et al. 2024):
1. ``block`` (Block-AP): block by block, the student block's weights, step sizes and zero-points learn
   to reproduce the float block's output (MSE) on the float model's hidden states; its input is the
   already trained student blocks' output, so each block corrects what the ones before it left.
   It needs one block's forward and backward per step: the cheap stage.
2. ``e2e`` (E2E-QP): the codes are frozen and only the step sizes learn, end to end, on
   KL(teacher || student) of the next-token distributions, against the teacher's top-k
   log-probabilities computed once and cached (``lowbit.train.distill``). With ``e2e_weight_lr`` > 0
   the weights learn too (codes follow them through the straight-through rounding, as in plain
   QAT): more capacity per step than step sizes alone, at the cost of Adam moments for every weight.

Training text: WikiText-2 validation by default (cleaned as for calibration) or a file; the last
``heldout`` windows are never trained on and give the held-out KL logged every ``eval_every`` steps.
Everything is drawn from ``seed``; the state (parameters, Adam moments, the stage's position and
hidden states) is saved in ``state_dir`` as safetensors after each block and every ``save_every``
steps, and ``resume`` continues from it to the same result as an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import resource
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from lowbit.device import cpu_has_bfloat16
from lowbit.pipeline.architectures import architecture_for
from lowbit.pipeline.statistics import capture_block_inputs
from lowbit.train.distill import TeacherTopK, cached_teacher_topk, check_same_vocabulary, kl_topk
from lowbit.train.qat_linear import QatLinear, qat_layers

STAGES = ("block", "e2e")
COMPUTE_DTYPES = ("float32", "bfloat16")
STATE_NAME = "qat_state.safetensors"
TEACHER_NAME = "teacher_topk.safetensors"


@dataclass(frozen=True)
class QatSettings:
    """The knobs of both stages. Learning rates follow EfficientQAT's ratios (weights five times
    slower than step sizes in Block-AP), scaled for a 135M model and a few hundred steps."""

    stages: tuple[str, ...] = STAGES
    data: str | None = None  # a text file; None: WikiText-2 validation
    seqlen: int = 512
    samples: int = 32  # training windows of seqlen tokens
    block_seqlen: int | None = None  # Block-AP on the windows cut into sequences this long (None: seqlen)
    heldout: int = 4  # held-out windows (from the end of the text) for the logged KL
    batch_size: int = 1  # E2E-QP windows per step
    block_batch_size: int = 4  # Block-AP sequences per step
    block_epochs: int = 2
    block_lr: float = 5e-3  # step sizes (relative: they learn in log space) and zero-points in Block-AP
    weight_lr: float = 2e-5  # weights in Block-AP (0: weights frozen, step sizes only)
    steps: int = 50  # E2E-QP steps
    lr: float = 2e-3  # step sizes in E2E-QP (relative, as block_lr)
    e2e_weight_lr: float = 0.0  # weights in E2E (0: codes frozen, EfficientQAT's E2E-QP; > 0: full QAT, straight-through)
    topk: int = 64
    log_every: int = 10
    eval_every: int = 25
    save_every: int = 10
    seed: int = 0
    gradient_checkpointing: bool = True
    # "bfloat16": the student's forward and backward under autocast (matmuls and attention in
    # bfloat16, master weights, step sizes, optimizer, loss and held-out KL in float32): on a CPU with
    # AVX512-BF16 a SmolLM2 step is about 1.4x faster (bench/qat_step_time.py), and the gradients
    # differ from float32's by a few percent. On a CPU without bfloat16 instructions torch emulates them
    # and a step is about 10x slower (train_qat warns). The teacher's cached log-probabilities are always float32.
    compute_dtype: str = "float32"

    def __post_init__(self) -> None:
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown or not self.stages:
            raise ValueError(f"unknown training stage(s) {unknown or '(none)'}; stages are {', '.join(STAGES)}")
        for name in ("seqlen", "samples", "heldout", "batch_size", "block_batch_size", "block_epochs", "steps", "topk", "log_every",
                     "eval_every", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("block_lr", "lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if self.block_seqlen is not None and (self.block_seqlen < 1 or self.seqlen % self.block_seqlen):
            raise ValueError(f"--block-seqlen must divide --seqlen {self.seqlen}, got {self.block_seqlen}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"--compute-dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {self.compute_dtype!r}")
        for name in ("weight_lr", "e2e_weight_lr"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0 (0 freezes the weights), got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class QatReport:
    """What a run did and cost. ``block_mse``: per block, the output MSE before and after training;
    ``heldout_kl``: ``(stage, step, KL)`` on the held-out windows against the teacher's top-k, and
    ``heldout_seconds`` when each was taken (this run's clock: a curve of quality against time)."""

    block_mse: list[tuple[float, float]] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    heldout_kl: list[tuple[str, int, float]] = field(default_factory=list)
    heldout_seconds: list[float] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    trainable_params: int = 0
    peak_rss_bytes: int = 0
    resumed_from: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class TrainingDiverged(ValueError):
    """The loss became NaN or infinite; the message names the step and the last good state."""


def training_windows(tokenizer: Any, settings: QatSettings, bos_id: int | None) -> tuple[Tensor, Tensor]:
    """``(train [samples, L], heldout [heldout, L])`` token windows of the training text, BOS first
    when ``bos_id`` is given: non-overlapping windows, the held-out ones from the text's end, the
    training ones drawn with ``seed`` from the rest.

    Raises:
        ValueError: the text is missing, empty, or too short for the windows asked for.
    """
    from lowbit.evaluate.text import token_windows
    from lowbit.pipeline.calibration import calibration_text

    try:
        text = calibration_text(settings.data)
    except FileNotFoundError as e:
        raise ValueError(f"no training text: {e}") from None
    if not text.strip():
        raise ValueError(f"training text {settings.data} is empty; pass --data FILE with text in it")
    try:
        windows = token_windows(text, tokenizer, settings.seqlen)
    except ValueError as e:
        raise ValueError(f"training text: {e}") from None
    if len(windows) < settings.samples + settings.heldout:
        raise ValueError(f"the training text gives {len(windows)} windows of {settings.seqlen} tokens, fewer than "
                         f"--samples {settings.samples} + --heldout {settings.heldout}; use a longer text or fewer")
    heldout = windows[-settings.heldout:]
    pick = torch.randperm(len(windows) - settings.heldout, generator=torch.Generator().manual_seed(settings.seed))
    train = windows[pick[:settings.samples].sort().values]
    if bos_id is not None:
        train, heldout = (torch.cat([torch.full((len(w), 1), bos_id, dtype=w.dtype), w], dim=1) for w in (train, heldout))
    return train.long(), heldout.long()


def train_qat(student: nn.Module, teacher: nn.Module, tokenizer: Any, settings: QatSettings, *, state_dir: str | Path,
              resume: bool = False, bos_id: int | None = None, log: Callable[[str], None] | None = print) -> QatReport:
    """Train ``student`` (its linears already ``QatLinear``: ``prepare_qat``) against ``teacher``.

    Raises:
        ValueError: bad settings or text, a teacher with another vocabulary, nothing to resume from.
        TrainingDiverged: a NaN/inf loss; the state saved before it is kept in ``state_dir``.
    """
    check_same_vocabulary(teacher, student)
    if not qat_layers(student):
        raise ValueError("the student has no QatLinear layers; call prepare_qat(student) first")
    _warn_if_emulated_bfloat16(student, settings)
    state_dir = Path(state_dir)
    state = _TrainingState(student, state_dir)
    position = state.load() if resume else None
    if resume and position is None:
        raise ValueError(f"nothing to resume: {state_dir / STATE_NAME} does not exist; drop --resume to start")
    report = QatReport(trainable_params=sum(p.numel() for m in qat_layers(student).values() for p in m.parameters()),
                       resumed_from=None if position is None else json.dumps(position))
    train_ids, heldout_ids = training_windows(tokenizer, settings, bos_id)
    log = log or (lambda _: None)
    start = time.perf_counter()
    teacher.eval()
    torch.manual_seed(settings.seed)
    heldout = cached_teacher_topk(teacher, heldout_ids, settings.topk, state_dir / f"heldout_{TEACHER_NAME}")
    report.seconds["teacher_heldout"] = time.perf_counter() - start
    if position is None:
        report.heldout_kl.append(("start", -1, heldout_kl(student, heldout)))
        report.heldout_seconds.append(time.perf_counter() - start)
        log(f"start: held-out KL (top-{settings.topk}) {report.heldout_kl[-1][2]:.4f}")
    for stage in settings.stages:
        if position is not None and STAGES.index(stage) < STAGES.index(position["stage"]):
            continue  # finished before the interruption
        t0 = time.perf_counter()
        at = position if position is not None and position["stage"] == stage else None
        if stage == "block":
            _block_ap(student, teacher, _cut(train_ids, settings.block_seqlen, bos_id), settings, state, at, report, log)
        else:
            _e2e_qp(student, teacher, train_ids, heldout, settings, state, at, report, log, start)
        report.seconds[stage] = time.perf_counter() - t0
        report.heldout_kl.append((stage, -1, heldout_kl(student, heldout)))
        report.heldout_seconds.append(time.perf_counter() - start)
        log(f"{stage} done in {report.seconds[stage]:.0f} s; held-out KL (top-{settings.topk}) "
            f"{report.heldout_kl[-1][2]:.4f}")
    report.seconds["total"] = time.perf_counter() - start
    report.peak_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    student.eval()
    return report


@torch.no_grad()
def heldout_kl(student: nn.Module, heldout: TeacherTopK) -> float:
    """Mean top-k KL(teacher || student) over the held-out windows."""
    was_training = student.training
    student.eval()
    total = sum(kl_topk(heldout.logprobs[i], heldout.index[i],
                        student(input_ids=heldout.ids[i:i + 1], use_cache=False).logits[0]).item()
                for i in range(len(heldout.ids)))
    student.train(was_training)
    return total / len(heldout.ids)


def _cut(ids: Tensor, seqlen: int | None, bos_id: int | None) -> Tensor:
    """Windows ``ids`` cut into independent sequences of ``seqlen`` text tokens (BOS first again when
    ``bos_id``): Block-AP's cost grows with the square of the length for attention, and a block's
    reconstruction needs positions more than it needs long contexts."""
    if seqlen is None:
        return ids
    text = ids[:, 1:] if bos_id is not None else ids
    short = text.reshape(-1, seqlen)
    if bos_id is not None:
        short = torch.cat([torch.full((len(short), 1), bos_id, dtype=short.dtype), short], dim=1)
    return short


def _cosine(step: int, total: int) -> float:
    return 0.5 * (1 + math.cos(math.pi * step / max(1, total)))


def _block_ap(student: nn.Module, teacher: nn.Module, ids: Tensor, settings: QatSettings, state: _TrainingState,
              at: dict[str, Any] | None, report: QatReport, log: Callable[[str], None]) -> None:
    """Stage 1, block by block (see the module docstring)."""
    arch = architecture_for(student)
    s_blocks, t_blocks = arch.block_list(student), arch.block_list(teacher)
    bs = settings.block_batch_size
    with torch.no_grad():
        t_hidden, t_args = capture_block_inputs(teacher, t_blocks, ids, bs)
        s_hidden, s_args = capture_block_inputs(student, s_blocks, ids, bs)
    first = 0
    if at is not None:
        first, t_hidden, s_hidden = at["block"], state.tensors["hidden.teacher"], state.tensors["hidden.student"]
    starts = list(range(0, len(ids), bs))
    total = settings.block_epochs * len(starts)
    for i in range(first, len(s_blocks)):
        block = s_blocks[i]
        with torch.no_grad():
            target = _run(t_blocks[i], t_hidden, t_args[i], bs)
        layers = [m for m in block.modules() if isinstance(m, QatLinear)]
        optimizer = _optimizer(layers, settings.block_lr, settings.weight_lr)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _cosine(s, total))
        generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + i)
        block.train()
        before = _block_mse(block, s_hidden, s_args[i], target, bs)
        for step in range(total):
            b = starts[int(torch.randint(len(starts), (1,), generator=generator))]
            x = s_hidden[b:b + bs]
            args, kwargs = s_args[i][x.shape[0]]
            with _autocast(block, settings):
                out = _output(block(x, *args, **kwargs))
            loss = F.mse_loss(out.float(), target[b:b + bs])
            _check_finite(loss, f"block {i} step {step}", state)
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
        block.eval()
        with torch.no_grad():
            after = _block_mse(block, s_hidden, s_args[i], target, bs)
            s_hidden = _run(block, s_hidden, s_args[i], bs)
        t_hidden = target
        report.block_mse.append((before, after))
        log(f"block {i + 1}/{len(s_blocks)}: output MSE {before:.4g} -> {after:.4g}")
        state.save({"stage": "block", "block": i + 1}, None,
                   {"hidden.teacher": t_hidden, "hidden.student": s_hidden} if i + 1 < len(s_blocks) else {})


def _e2e_qp(student: nn.Module, teacher: nn.Module, ids: Tensor, heldout: TeacherTopK, settings: QatSettings,
            state: _TrainingState, at: dict[str, Any] | None, report: QatReport, log: Callable[[str], None],
            clock: float) -> None:
    """Stage 2: step sizes (and, with ``e2e_weight_lr``, weights and zero-points) trained end to end
    on the top-k KL to the teacher; without ``e2e_weight_lr`` the codes are frozen first."""
    layers = list(qat_layers(student).values())
    t0 = time.perf_counter()
    cache = cached_teacher_topk(teacher, ids, settings.topk, state.directory / TEACHER_NAME)
    report.seconds["teacher_train"] = time.perf_counter() - t0
    full = settings.e2e_weight_lr > 0
    for layer in layers:
        if layer.codes is None and not full:
            layer.freeze_codes()
    optimizer = _optimizer(layers, settings.lr, settings.e2e_weight_lr, zero=full)
    first = 0
    if at is not None:
        first = at["step"]
        state.load_optimizer(optimizer)
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _cosine(s, settings.steps), last_epoch=first - 1)
    order = _batch_order(len(ids), settings)
    if settings.gradient_checkpointing:
        student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    student.train()
    for step in range(first, settings.steps):
        batch = order[step]
        with _autocast(student, settings):
            logits = student(input_ids=cache.ids[batch], use_cache=False).logits
        loss = kl_topk(cache.logprobs[batch], cache.index[batch], logits)
        _check_finite(loss, f"e2e step {step}", state)
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        report.losses.append(loss.item())
        done = step + 1
        if done % settings.log_every == 0:
            recent = report.losses[-settings.log_every:]
            log(f"e2e step {done}/{settings.steps}  loss {sum(recent) / len(recent):.4f}")
        if done % settings.eval_every == 0 and done < settings.steps:
            report.heldout_kl.append(("e2e", done, heldout_kl(student, heldout)))
            report.heldout_seconds.append(time.perf_counter() - clock)
            log(f"e2e step {done}: held-out KL (top-{settings.topk}) {report.heldout_kl[-1][2]:.4f}")
        if done % settings.save_every == 0 or done == settings.steps:
            state.save({"stage": "e2e", "step": done}, optimizer, {})
    if settings.gradient_checkpointing:
        student.activation_checkpointing_disable()


def _autocast(model: nn.Module, settings: QatSettings) -> torch.autocast:
    """The training forward's autocast context: bfloat16 on ``model``'s device when asked, else off."""
    device = next(model.parameters()).device.type
    return torch.autocast(device, dtype=torch.bfloat16, enabled=settings.compute_dtype == "bfloat16")


def _warn_if_emulated_bfloat16(model: nn.Module, settings: QatSettings) -> None:
    """One warning line when ``--compute-dtype bfloat16`` would run on a CPU without bfloat16 instructions,
    where it is about ten times slower than float32 (see ``lowbit.device.cpu_has_bfloat16``)."""
    if settings.compute_dtype == "bfloat16" and next(model.parameters()).device.type == "cpu" \
            and cpu_has_bfloat16() is False:
        warnings.warn("--compute-dtype bfloat16: this CPU has no bfloat16 instructions (AVX512-BF16, AMX or Arm BF16), "
                      "so torch emulates them and a step runs about 10x slower than float32; use --compute-dtype "
                      "float32", stacklevel=3)


def _batch_order(n: int, settings: QatSettings) -> list[Tensor]:
    """The windows of every E2E step, drawn once from ``seed``: epochs of shuffled windows."""
    generator = torch.Generator().manual_seed(settings.seed + 1)
    flat = torch.cat([torch.randperm(n, generator=generator)
                      for _ in range(-(-settings.steps * settings.batch_size // n))])
    return [flat[s * settings.batch_size:(s + 1) * settings.batch_size] for s in range(settings.steps)]


def _optimizer(layers: list[QatLinear], scale_lr: float, weight_lr: float, zero: bool = True) -> torch.optim.Optimizer:
    """Adam over the layers' step sizes (weight and static input scales; zero-points / codebooks), plus their
    weights when ``weight_lr`` > 0;
    everything else stops learning."""
    quant, weights = [], []
    for layer in layers:
        for name, p in layer.named_parameters():
            learn = (name == "weight" and weight_lr > 0 and layer.codes is None) \
                or name in ("log_scale", "codebook", "log_input_scale") or (name == "zero" and zero)
            p.requires_grad_(learn and name != "bias")
            if p.requires_grad:
                (weights if name == "weight" else quant).append(p)
    groups = [{"params": quant, "lr": scale_lr}] + ([{"params": weights, "lr": weight_lr}] if weights else [])
    return torch.optim.Adam(groups)


def _run(block: nn.Module, hidden: Tensor, args_by_size: dict[int, Any], bs: int) -> Tensor:
    out = torch.empty_like(hidden)
    for b in range(0, len(hidden), bs):
        args, kwargs = args_by_size[hidden[b:b + bs].shape[0]]
        out[b:b + bs] = _output(block(hidden[b:b + bs], *args, **kwargs))
    return out


@torch.no_grad()
def _block_mse(block: nn.Module, hidden: Tensor, args_by_size: dict[int, Any], target: Tensor, bs: int) -> float:
    return F.mse_loss(_run(block, hidden, args_by_size, bs), target).item()


def _output(out: Any) -> Tensor:
    return out[0] if isinstance(out, tuple) else out


def _check_finite(loss: Tensor, where: str, state: _TrainingState) -> None:
    if not math.isfinite(loss.item()):
        raise TrainingDiverged(f"training loss became {loss.item()} at {where}; {state.kept()}; lower the learning "
                               "rate and --resume")


class _TrainingState:
    """The student's trainable tensors, Adam's moments and the stage's position, in one safetensors
    file written through a temporary name (an interruption leaves the previous state whole)."""

    def __init__(self, student: nn.Module, directory: Path) -> None:
        self.student = student
        self.directory = directory
        self.path = directory / STATE_NAME
        self.tensors: dict[str, Tensor] = {}
        self.last_position: dict[str, Any] | None = None

    def _layer_tensors(self) -> dict[str, Tensor]:
        out = {}
        for name, layer in qat_layers(self.student).items():
            for key, t in (*layer.named_parameters(), *layer.named_buffers()):
                out[f"layer.{name}.{key}"] = t.detach()
        return out

    def save(self, position: dict[str, Any], optimizer: torch.optim.Optimizer | None, extra: dict[str, Tensor]) -> None:
        """Write the state at ``position``; a non-finite parameter is never saved over the last good state.

        Raises:
            TrainingDiverged: a layer tensor is NaN or infinite.
        """
        tensors = {**self._layer_tensors(), **{k: v.contiguous() for k, v in extra.items()}}
        bad = next((k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()), None)
        if bad is not None:
            raise TrainingDiverged(f"{bad} became non-finite before {json.dumps(position)}; {self.kept()}; "
                                   "lower the learning rate and --resume")
        if optimizer is not None:
            for i, s in optimizer.state_dict()["state"].items():
                for key, t in s.items():
                    tensors[f"adam.{i}.{key}"] = t.reshape(-1) if key == "step" else t
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.partial-{os.getpid()}")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"position": json.dumps(position)})
        os.replace(tmp, self.path)
        self.last_position = position

    def kept(self) -> str:
        """Where the last good state is, for messages."""
        if self.last_position is None:
            return "no state was saved yet"
        return f"the last good state ({json.dumps(self.last_position)}) is kept in {self.path}"

    def load(self) -> dict[str, Any] | None:
        """Put the saved layer tensors into the student and return the saved position (None: no state)."""
        if not self.path.is_file():
            return None
        try:
            with safe_open(str(self.path), "pt") as f:
                position = json.loads(f.metadata()["position"])
                self.tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, KeyError, ValueError) as e:
            raise ValueError(f"{self.path} is not a lowbit training state ({e}); remove it to start over") from None
        layers = qat_layers(self.student)
        for key, t in self.tensors.items():
            if not key.startswith("layer."):
                continue
            name, _, attr = key[len("layer."):].rpartition(".")
            if name not in layers:
                raise ValueError(f"{self.path} holds layer {name}, which this student does not have; "
                                 "resume with the student the state was made for")
            if attr == "codes":
                layers[name].codes = t
                layers[name].weight.requires_grad_(False)
            else:
                getattr(layers[name], attr).data.copy_(t)
        self.last_position = position
        return position

    def load_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        state: dict[int, dict[str, Tensor]] = {}
        for key, t in self.tensors.items():
            if key.startswith("adam."):
                _, i, name = key.split(".", 2)
                state.setdefault(int(i), {})[name] = t.reshape(()) if name == "step" else t
        optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})

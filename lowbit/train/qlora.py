"""QLoRA fine-tuning: LoRA adapters (peft) trained on a frozen 4-bit base, on a CPU if need be.

    model, tokenizer = load_base("smollm2-135m", LowbitConfig(load_in_4bit=True))  # NF4 + double quant
    peft_model = add_lora(model, LoraSettings(r=16))
    report = train(peft_model, tokenizer, TrainSettings(data="input.txt", steps=300))
    peft_model.save_pretrained("adapter")  # loads with PeftModel.from_pretrained on a float base

The text is cut into windows of ``seqlen`` tokens; the last ``holdout`` fraction of windows is kept
out of training for evaluation (``split_windows``). Gradient checkpointing recomputes each block in
the backward pass, so activations for one block at a time are alive, not for the whole model.
"""

from __future__ import annotations

import json
import math
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from lowbit.evaluate.text import read_utf8, token_windows
from lowbit.io.output import ADAPTER_RECORD, check_output, staged_output
from lowbit.io.pickles import check_no_pickle
from lowbit.nn.qlinear import QuantLinear
from lowbit.sources import needs_bos
from lowbit.train.lora_layer import QuantLoraLinear

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraSettings:
    """The adapter's shape: rank, scaling (alpha / r), dropout and which linears get one."""

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"--lora-r must be at least 1, got {self.r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"--lora-dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ValueError("--target needs at least one module name")


@dataclass(frozen=True)
class TrainSettings:
    """How to train: text, window length, batch, steps, learning rate (constant after warmup), seed."""

    data: str
    steps: int = 200
    seqlen: int = 256
    batch_size: int = 4
    lr: float = 2e-4  # QLoRA's rate for models under 13B
    warmup: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 0.3  # QLoRA's clipping
    holdout: float = 0.1
    seed: int = 0
    gradient_checkpointing: bool = True
    log_every: int = 10

    def __post_init__(self) -> None:
        for name in ("steps", "seqlen", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.holdout < 1:
            raise ValueError(f"holdout must be in (0, 1), got {self.holdout}")
        if not self.lr > 0 or self.warmup < 0:
            raise ValueError(f"--lr must be > 0 and --warmup >= 0, got {self.lr} and {self.warmup}")


@dataclass
class TrainReport:
    """What a run did and cost: losses, time per step, trainable parameters and memory."""

    steps: int
    losses: list[float] = field(default_factory=list)
    seconds_per_step: float = 0.0
    trainable_params: int = 0
    optimizer_state_bytes: int = 0
    peak_rss_bytes: int = 0
    train_windows: int = 0
    heldout_windows: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def add_lora(model: nn.Module, settings: LoraSettings) -> PeftModel:
    """Wrap ``model`` with trainable LoRA adapters on every linear whose name ends in a target.

    Quantized linears (``QuantLinear``) get ``QuantLoraLinear``; float ``nn.Linear`` get peft's own.
    Everything else is frozen.

    Raises:
        ValueError: a target matches no linear layer (the message lists the names there are).
    """
    linear_names = {n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, (nn.Linear, QuantLinear))}
    unknown = [t for t in settings.targets if t not in linear_names]
    if unknown:
        raise ValueError(f"--target {','.join(unknown)} matches no linear layer of this model; "
                         f"its linear layers are named {', '.join(sorted(linear_names))}")
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=list(settings.targets), task_type="CAUSAL_LM", bias="none")
    config._register_custom_module({QuantLinear: QuantLoraLinear})
    for p in model.parameters():
        p.requires_grad_(False)
    return get_peft_model(model, config)


def read_training_text(path: str | Path) -> str:
    """The training file's text, as it is (no WikiText line joining).

    Raises:
        ValueError: the file is missing, empty or not UTF-8.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"training text {path} not found; pass --data FILE")
    text = read_utf8(path)
    if not text.strip():
        raise ValueError(f"training text {path} is empty")
    return text


def split_windows(text: str, tokenizer: Any, seqlen: int, holdout: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train [n, seqlen], heldout [m, seqlen])``: the text's windows, the last ``holdout`` share held out.

    Raises:
        ValueError: the text is empty or too short for one training and one held-out window.
    """
    try:
        windows = token_windows(text, tokenizer, seqlen)
    except ValueError as e:
        raise ValueError(f"training text: {e}") from None
    n_heldout = max(1, round(len(windows) * holdout))
    if len(windows) - n_heldout < 1:
        raise ValueError(f"training text gives {len(windows)} window(s) of {seqlen} tokens; it needs at least 2 "
                         "(one to train on, one held out): use a longer text or a smaller --seqlen")
    return windows[:-n_heldout], windows[-n_heldout:]


def train(model: PeftModel, tokenizer: Any, settings: TrainSettings, *, progress: bool = True) -> TrainReport:
    """Train the adapters of ``model`` on ``settings.data`` with AdamW; the base stays frozen.

    Batches are drawn with ``settings.seed``, so the same inputs and seed give the same adapter.
    """
    torch.manual_seed(settings.seed)
    train_windows, heldout = split_windows(read_training_text(settings.data), tokenizer, settings.seqlen, settings.holdout)
    bos = tokenizer.bos_token_id if needs_bos(tokenizer) else None
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, settings.warmup)))
    if settings.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    generator = torch.Generator().manual_seed(settings.seed)
    report = TrainReport(steps=settings.steps, trainable_params=sum(p.numel() for p in params),
                         train_windows=len(train_windows), heldout_windows=len(heldout))
    start = time.perf_counter()
    for step in range(settings.steps):
        batch = train_windows[torch.randint(len(train_windows), (settings.batch_size,), generator=generator)]
        if bos is not None:
            batch = torch.cat([torch.full((len(batch), 1), bos, dtype=batch.dtype), batch], dim=1)
        loss = model(input_ids=batch, labels=batch).loss
        if not math.isfinite(loss.item()):
            raise ValueError(f"training loss became {loss.item()} at step {step}; lower --lr")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        report.losses.append(loss.item())
        if progress and (step + 1) % settings.log_every == 0:
            recent = report.losses[-settings.log_every:]
            print(f"step {step + 1}/{settings.steps}  loss {sum(recent) / len(recent):.4f}", flush=True)
    report.seconds_per_step = (time.perf_counter() - start) / settings.steps
    report.optimizer_state_bytes = sum(t.numel() * t.element_size() for s in optimizer.state.values()
                                       for t in s.values() if torch.is_tensor(t))
    report.peak_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    model.eval()
    return report


def save_adapter(model: PeftModel, out_dir: str | Path, *, base: str, overwrite: bool = False) -> Path:
    """peft's ``save_pretrained`` plus ``ADAPTER_RECORD``, the base's shape (checked by ``load_adapter``;
    it also marks the directory as lowbit's, which ``overwrite`` may replace), written atomically by
    ``lowbit.io.output.staged_output``.

    Raises:
        FileExistsError: ``out_dir`` exists and ``overwrite`` is False, or it is not lowbit's.
        OutputError: ``out_dir`` cannot be written, or another process is writing it.
    """
    out_dir = Path(out_dir)
    with staged_output(out_dir, overwrite=overwrite, directory=True) as tmp:
        model.save_pretrained(tmp)
        (tmp / ADAPTER_RECORD).write_text(json.dumps({"base": base, **_base_shape(model)}, indent=2) + "\n")
    return out_dir


def load_adapter(model: nn.Module, adapter_dir: str | Path, *, trainable: bool = True,
                 allow_pickle: bool = False) -> PeftModel:
    """Put a saved adapter on ``model`` (quantized or float), to resume training or to evaluate. An
    adapter saved as a pickle (``adapter_model.bin``) is read only with ``allow_pickle``.

    Raises:
        ValueError: the directory holds no adapter, only a pickle one, or the adapter was trained on
            another base model.
    """
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ValueError(f"{adapter_dir} holds no adapter (adapter_config.json missing)")
    check_no_pickle(adapter_dir, allow_pickle=allow_pickle)
    record = adapter_dir / ADAPTER_RECORD
    if record.is_file():
        saved = json.loads(record.read_text())
        here = _base_shape(model)
        different = {k: (saved.get(k), v) for k, v in here.items() if saved.get(k) != v}
        if different:
            detail = ", ".join(f"{k} {a} there, {b} here" for k, (a, b) in different.items())
            raise ValueError(f"adapter {adapter_dir} was trained on another base model ({saved.get('base')}: "
                             f"{detail}); use the base it was trained on")
    config = LoraConfig.from_pretrained(adapter_dir)
    config._register_custom_module({QuantLinear: QuantLoraLinear})
    return PeftModel.from_pretrained(model, adapter_dir, config=config, is_trainable=trainable)


def _base_shape(model: nn.Module) -> dict[str, Any]:
    config = model.config
    return {k: getattr(config, k, None) for k in ("model_type", "hidden_size", "num_hidden_layers",
                                                   "intermediate_size", "vocab_size")}


def load_base(source: str, config: Any | None, *, verify: bool = True,
              allow_pickle: bool = False) -> tuple[nn.Module, Any]:
    """(model, tokenizer) to train on: ``source`` quantized on load with ``config`` (a ``LowbitConfig``),
    a lowbit checkpoint as it is (checked against its manifest unless ``verify`` is False), or
    (``config`` None) the float model; float weights from safetensors only unless ``allow_pickle``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowbit.io.checkpoint import is_lowbit_checkpoint, load_quantized
    from lowbit.pipeline.recipe import Recipe
    from lowbit.pipeline.sequential import quantize_sequential
    from lowbit.sources import load_model, resolve_model, safetensors_only

    resolved = resolve_model(source)
    if config is None or resolved.kind == "gguf" or is_lowbit_checkpoint(resolved.path):
        if is_lowbit_checkpoint(resolved.path):
            return load_quantized(resolved.path, verify=verify)
        model, tokenizer = load_model(source, allow_pickle=allow_pickle)
        if config is not None:  # a .gguf: quantize in place
            quantize_sequential(model, Recipe(default=config.weight_scheme(), skip=tuple(config.skip_modules)),
                                progress=False)
        return model, tokenizer
    kwargs = safetensors_only(resolved, allow_pickle=allow_pickle)
    model = AutoModelForCausalLM.from_pretrained(resolved.path, quantization_config=config, **kwargs)
    return model, AutoTokenizer.from_pretrained(resolved.path, local_files_only=kwargs.get("local_files_only", False))


def heldout_perplexity(model: nn.Module, tokenizer: Any, settings: TrainSettings, windows: int) -> float:
    """Perplexity on the first ``windows`` held-out windows of the training text (see ``split_windows``)."""
    from lowbit.evaluate.perplexity import evaluate_windows

    _, heldout = split_windows(read_training_text(settings.data), tokenizer, settings.seqlen, settings.holdout)
    bos = tokenizer.bos_token_id if needs_bos(tokenizer) else None
    return evaluate_windows(model, heldout[:windows], bos_id=bos, progress=False).ppl


def merge_and_save(model: PeftModel, out_dir: str | Path, tokenizer: Any, *, overwrite: bool = False) -> Path:
    """Fold the adapters into the base and save: a lowbit checkpoint (re-quantized with each layer's
    scheme) for a quantized base, a plain transformers directory for a float one; either written
    atomically under the rules of ``lowbit.io.output`` (a float directory is not lowbit's, so
    ``overwrite`` will not replace one later).

    Raises:
        FileExistsError: ``out_dir`` exists and ``overwrite`` is False, or it is not lowbit's.
        OutputError: ``out_dir`` cannot be written, or another process is writing it.
    """
    from lowbit.io.checkpoint import save_quantized
    from lowbit.nn import quantized_layers
    from lowbit.pipeline.recipe import Recipe

    check_output(out_dir, overwrite)  # before the merge, which takes a while
    merged = model.merge_and_unload()
    layers = quantized_layers(merged)
    if not layers:
        with staged_output(out_dir, overwrite=overwrite, directory=True) as tmp:
            merged.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        return Path(out_dir)
    recipe = Recipe(method="rtn", default=next(iter(layers.values())).scheme)
    return save_quantized(merged, out_dir, recipe=recipe, tokenizer=tokenizer, overwrite=overwrite)

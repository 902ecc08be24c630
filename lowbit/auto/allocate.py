"""Allocation: one candidate per tensor, least summed proxy error, within the budget in stored bits.

``allocate`` gives a lowbit recipe (one override per tensor that differs from the most common
choice, so the recipe stays a plain, reviewable file); ``allocate_gguf`` gives GGUF tensor types.
Both record, per tensor, what it got and why: its proxy error there, and what the next larger
candidate would have bought for how many more bits (``TensorChoice.why``).

Budgets (``budget.Budget``): bits per weight count the block linears, as the README tables do (the
LM head keeps the recipe's treatment); a file size counts everything, so the tensors not chosen for
(norms, biases, tokenizer, metadata, a margin for headers) are subtracted first and the LM head (a
tied embedding stays tied: one tensor) joins the candidates.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from lowbit.auto.budget import Budget
from lowbit.auto.candidates import GGUF_CANDIDATES, HEAD_CANDIDATES, LOWBIT_CANDIDATES, Candidate, padded_bytes
from lowbit.auto.knapsack import solve_mckp
from lowbit.auto.sensitivity import GPTQ_PROXY_WINDOWS, PROXY_WINDOWS, TensorSensitivity, measure_sensitivity
from lowbit.pipeline.architectures import architecture_for
from lowbit.pipeline.holdout import HoldOut
from lowbit.pipeline.recipe import Override, Recipe, TransformStep, exact_pattern
from lowbit.pipeline.sequential import is_linear

# Bytes of a lowbit checkpoint besides the tensors' data, per allocated tensor: its safetensors
# header entries, its record and override in config.json (measured ~1.2 KiB on SmolLM2), doubled.
CHECKPOINT_BYTES_PER_TENSOR = 2560
CHECKPOINT_MARGIN_BYTES = 256 * 1024  # config.json's model part, manifest, generation config


@dataclass(frozen=True)
class TensorChoice:
    """What one tensor got: ``candidate`` (scheme or GGUF type name), its stored ``bits`` and proxy
    ``error``, and ``why`` in words."""

    name: str
    shape: tuple[int, int]
    candidate: str
    bits: int
    error: float
    why: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "candidate": self.candidate, "bits": self.bits,
                "bpw": self.bits / (self.shape[0] * self.shape[1]), "error": self.error, "why": self.why}


@dataclass
class Allocation:
    """The result of an allocation.

    Fields:
        budget: what was asked.
        budget_bits: the bits the allocated tensors may store in all (after the fixed part).
        fixed_bytes: bytes counted outside the allocated tensors (size budgets only; 0 otherwise).
        choices: per allocated tensor, in model order.
        skipped: per tensor, the candidates that could not take it, with why.
        seconds: sensitivity pass + solve, wall time.
        recipe: the lowbit recipe (``allocate``), else None.
        gguf_types: HF parameter name -> GGUF type name (``allocate_gguf``), else None.
    """

    budget: Budget
    budget_bits: int
    fixed_bytes: int
    choices: list[TensorChoice]
    skipped: dict[str, dict[str, str]] = field(default_factory=dict)
    seconds: float = 0.0
    recipe: Recipe | None = None
    gguf_types: dict[str, str] | None = None

    @property
    def bits(self) -> int:
        return sum(c.bits for c in self.choices)

    @property
    def bpw(self) -> float:
        return self.bits / sum(c.shape[0] * c.shape[1] for c in self.choices)

    def counts(self) -> dict[str, int]:
        return dict(Counter(c.candidate for c in self.choices).most_common())

    def to_dict(self) -> dict[str, Any]:
        return {"budget": self.budget.to_dict(), "budget_bits": self.budget_bits, "fixed_bytes": self.fixed_bytes,
                "bits": self.bits, "bpw": self.bpw, "seconds": self.seconds, "counts": self.counts(),
                "tensors": [c.to_dict() for c in self.choices],
                "skipped": {n: s for n, s in self.skipped.items() if s}}

    def skipped_candidates(self) -> dict[str, tuple[int, str]]:
        """Per candidate that some tensor could not take: on how many tensors, and the first reason."""
        out: dict[str, tuple[int, str]] = {}
        for reasons in self.skipped.values():
            for candidate, why in reasons.items():
                count, first = out.get(candidate, (0, why))
                out[candidate] = (count + 1, first)
        return out

    def summary(self) -> str:
        counts = ", ".join(f"{n} x{k}" for n, k in self.counts().items())
        line = (f"allocated {len(self.choices)} tensors under {self.budget.describe()}: {self.bpw:.4f} bits/weight "
                f"({self.bits:,} of {self.budget_bits:,} bits); {counts}; {self.seconds:.1f} s")
        skipped = "; ".join(f"{c} on {n} tensors ({why})" for c, (n, why) in self.skipped_candidates().items())
        return line + (f"\nskipped candidates: {skipped}" if skipped else "")


def _head_name(model: nn.Module) -> str | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return next((n for n, m in model.named_modules() if m is head), None) if is_linear(head) else None


def block_linears(model: nn.Module) -> list[str]:
    """Full names of the linears inside the decoder blocks, in model order."""
    prefix = architecture_for(model).blocks + "."
    return [n for n, m in model.named_modules() if is_linear(m) and n.startswith(prefix)]


def _choose(table: dict[str, TensorSensitivity], budget_bits: int, budget: Budget) -> list[TensorChoice]:
    """Solve the knapsack over ``table`` and explain each choice; one line on an impossible budget."""
    for name, t in table.items():
        if not t.options:
            reasons = "; ".join(f"{c}: {why}" for c, why in t.skipped.items())
            raise ValueError(f"no candidate fits {name} {t.shape[0]}x{t.shape[1]} ({reasons})")
    weights = sum(t.weights for t in table.values())
    lo = sum(min(o.bits for o in t.options) for t in table.values())
    hi = sum(max(o.bits for o in t.options) for t in table.values())
    if not lo <= budget_bits:
        raise ValueError(f"budget {budget.describe()} is below the smallest the candidates allow: "
                         f"{_range(lo, hi, weights, budget)}")
    if budget_bits > hi and budget.bpw is not None:
        raise ValueError(f"budget {budget.describe()} is above the largest the candidates allow: "
                         f"{_range(lo, hi, weights, budget)}; quantize with one scheme instead")
    picked = solve_mckp([[o.bits for o in t.options] for t in table.values()],
                        [[o.error for o in t.options] for t in table.values()], min(budget_bits, hi))
    return [_explain(t, j) for t, j in zip(table.values(), picked)]


def _range(lo: int, hi: int, weights: int, budget: Budget) -> str:
    """The possible range in the budget's own terms: bits per weight, or MiB of the allocated tensors."""
    if budget.bpw is not None:
        return f"possible {lo / weights:.4f} to {hi / weights:.4f} bits/weight"
    return f"the allocated tensors need {lo / 8 / 2**20:.2f} to {hi / 8 / 2**20:.2f} MiB"


def _explain(t: TensorSensitivity, j: int) -> TensorChoice:
    o = t.options[j]
    better = [b for b in t.options if b.bits > o.bits and b.error < o.error]
    cheaper = [b for b in t.options if b.bits < o.bits]
    parts = [f"proxy error {o.error:.3g}"]
    if better:
        b = min(better, key=lambda b: b.bits)
        parts.append(f"{b.candidate.name} would cut it to {b.error:.3g} for {b.bits - o.bits:,} more bits")
    if cheaper:
        c = max(cheaper, key=lambda c: c.bits)
        parts.append(f"{c.candidate.name} would save {o.bits - c.bits:,} bits at {c.error:.3g}")
    return TensorChoice(t.name, t.shape, o.candidate.name, o.bits, o.error, "; ".join(parts))


def recipe_of(choices: Sequence[TensorChoice], schemes: dict[str, Any], head: str | None, *, method: str = "rtn",
              method_config: Any = None, transforms: Sequence[TransformStep | str] = (),
              holdout: HoldOut | None = None) -> Recipe:
    """A plain recipe giving each tensor its chosen scheme: the most common choice as the default,
    one exact-name override per other tensor; the LM head is skipped unless it was allocated.
    ``holdout`` (the pipeline's held-out choice of each linear's method) is carried as it is."""
    default = Counter(c.candidate for c in choices if c.name != head).most_common(1)[0][0]
    overrides = tuple(Override(exact_pattern(c.name), schemes[c.candidate]) for c in choices if c.candidate != default
                      or c.name == head)
    head_chosen = any(c.name == head for c in choices)
    skip = () if head_chosen else (("lm_head",) if head is None else (exact_pattern(head),))
    return Recipe(method=method, method_config=method_config, transforms=tuple(transforms),
                  default=schemes[default], overrides=overrides, skip=skip, holdout=holdout)


def _fixed_checkpoint_bytes(model: nn.Module, allocated: Sequence[str], extra_bytes: int) -> int:
    """Bytes of a lowbit checkpoint outside the allocated weights: every other tensor as stored (a
    tied embedding is the head's codes), ``extra_bytes`` (tokenizer files) and the header margin."""
    chosen = {id(model.get_submodule(n).weight) for n in allocated}
    seen, total = set(), 0
    for t in model.state_dict(keep_vars=True).values():
        key = t.untyped_storage().data_ptr()
        if id(t) in chosen or key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total + extra_bytes + CHECKPOINT_MARGIN_BYTES + CHECKPOINT_BYTES_PER_TENSOR * len(allocated)


def allocate(model: nn.Module, calibration: Tensor | None, budget: Budget, *, method: str = "rtn",
             method_config: Any = None, transforms: Sequence[TransformStep | str] = (),
             holdout: HoldOut | None = None, candidates: Sequence[Candidate] = LOWBIT_CANDIDATES,
             head_candidates: Sequence[Candidate] = HEAD_CANDIDATES, extra_bytes: int = 0,
             table: dict[str, TensorSensitivity] | None = None, progress: bool = True) -> Allocation:
    """Choose a scheme for every block linear (and, under a size budget, the LM head) of ``model``.

    Args:
        model: a float Hugging Face causal LM of ``pipeline.architectures`` (only read).
        calibration: int64 token windows ``[samples, seqlen]`` for the Hessians of the proxy.
        budget: ``Budget(bpw=...)`` over the block linears, or ``Budget(size_bytes=...)`` of the
            whole checkpoint.
        method, method_config, transforms: what the recipe will quantize with (``Recipe``'s fields).
        holdout: the recipe's held-out choice of each linear's method (``Recipe.holdout``), kept in
            the allocated recipe; the proxy scores the candidates as ``method`` leaves them.
        candidates, head_candidates: lowbit-scheme candidates of the block linears and the LM head.
        extra_bytes: bytes of files the checkpoint holds besides weights and config (the tokenizer's).
        table: sensitivities measured before (``measure_sensitivity``) for the same tensors,
            candidates and method, so several budgets share one calibration pass; None measures them
            here (weighed as ``method`` leaves the errors: GPTQ's error feedback is counted).

    Raises:
        ValueError: no calibration, a budget outside what the candidates allow (saying the range),
            a candidate that is no lowbit scheme, a tensor no candidate fits.
    """
    if calibration is None and table is None:
        raise ValueError("the allocator's sensitivity proxy needs calibration data; pass --calib PATH "
                         "(default: WikiText-2 valid from ../shared/data)")
    if any(c.scheme is None for c in [*candidates, *head_candidates]):
        raise ValueError("lowbit allocation takes lowbit schemes as candidates; GGUF types go to allocate_gguf")
    start = time.perf_counter()
    names = block_linears(model)
    head = _head_name(model)
    with_head = budget.size_bytes is not None and head is not None
    fixed = 0
    if budget.size_bytes is not None:
        fixed = _fixed_checkpoint_bytes(model, [*names, *([head] if with_head else [])], extra_bytes)
        if fixed >= budget.size_bytes:
            raise ValueError(f"target size {budget.describe()} is below what the checkpoint needs besides the "
                             f"allocated weights ({fixed / 2**20:.2f} MiB)")
        budget_bits = (budget.size_bytes - fixed) * 8
    else:
        budget_bits = int(budget.bpw * sum(model.get_submodule(n).weight.numel() for n in names))
    allocated = [*names, *([head] if with_head else [])]
    if table is None:
        table = measure_sensitivity(model, calibration, lambda n: head_candidates if n == head else candidates,
                                    allocated, method=method, method_config=method_config, progress=progress)
    else:
        table = {n: table[n] for n in allocated}
    choices = _choose(table, budget_bits, budget)
    schemes = {c.name: c.scheme for c in [*candidates, *head_candidates]}
    recipe = recipe_of(choices, schemes, head, method=method, method_config=method_config, transforms=transforms,
                       holdout=holdout)
    return Allocation(budget, budget_bits, fixed, choices, {n: t.skipped for n, t in table.items()},
                      time.perf_counter() - start, recipe=recipe)


def _gguf_params(model: nn.Module) -> dict[str, str]:
    """Module name -> the HF parameter the GGUF file stores it as, for every tensor ``allocate_gguf``
    chooses: the block linears and the LM head (the input embedding's parameter when tied)."""
    head = _head_name(model)
    params = {n: f"{n}.weight" for n in block_linears(model)}
    if head is not None:
        embedding = model.get_input_embeddings().weight
        tied = model.get_output_embeddings().weight is embedding
        params[head] = next(n for n, p in model.named_parameters() if p is embedding) if tied else f"{head}.weight"
    return params


def gguf_budget(model: nn.Module, tokenizer: Any, target: str) -> tuple[Budget, int, str]:
    """``(budget, bits for the allocated tensors' data, file type for the metadata)`` of a GGUF
    ``target``: a named mix (``"Q4_K_M"``: the file lowbit's export of that mix would be) or a size
    (``"90MiB"``). The header, metadata and tensors not allocated (norms) are measured and subtracted.

    Raises:
        ValueError: a target that is neither a mix name nor a size, or one below the fixed part.
    """
    from lowbit.auto.budget import parse_size
    from lowbit.gguf.export import header_bytes, plan_tensors
    from lowbit.gguf.mixes import FILE_TYPES

    mix = FILE_TYPES.get(str(target).upper())
    qtype = mix.name if mix is not None else "Q4_K_M"
    plan = plan_tensors(model, qtype)
    allocated = set(_gguf_params(model).values())
    header = header_bytes(model, tokenizer, qtype)
    fixed = header + sum(padded_bytes(t, shape) for hf, _, shape, t, _ in plan if hf not in allocated)
    if mix is not None:
        data = sum(padded_bytes(t, shape) for hf, _, shape, t, _ in plan if hf in allocated)
        return Budget(size_bytes=fixed + data), data * 8, qtype
    size = parse_size(target)
    if size <= fixed:
        raise ValueError(f"target size {target} is below what the GGUF file needs besides the allocated tensors "
                         f"({fixed / 2**20:.2f} MiB: header, tokenizer, norms)")
    return Budget(size_bytes=size), (size - fixed) * 8, qtype


def allocate_gguf(model: nn.Module, tokenizer: Any, calibration: Tensor | None, target: str, *,
                  method: str = "rtn", candidates: Sequence[Candidate] = GGUF_CANDIDATES,
                  windows: int = PROXY_WINDOWS, gptq_windows: int = GPTQ_PROXY_WINDOWS,
                  progress: bool = True) -> Allocation:
    """Choose a GGUF tensor type for every weight matrix the GGUF file quantizes: the block linears
    and the LM head (written as ``token_embd`` when tied), so that the file is at most ``target``
    (a size, or a named mix's size, ``gguf_budget``). ``Allocation.gguf_types`` maps HF parameter
    names to the types (what ``export_gguf(tensor_types=...)`` takes). ``method`` is how the file's
    blocks will be fitted: ``"gptq"`` (``export_gguf`` with GPTQ onto the block grids) weighs the
    block linears' errors as GPTQ leaves them, ``"rtn"`` (the importance search alone) by the
    Hessian's diagonal (``measure_sensitivity``, which reads the first ``windows`` and
    ``gptq_windows`` windows of ``calibration``). Raises like ``allocate``."""
    if calibration is None:
        raise ValueError("the allocator's sensitivity proxy needs calibration data; pass --calib PATH "
                         "(default: WikiText-2 valid from ../shared/data)")
    if any(c.gguf_type is None for c in candidates):
        raise ValueError("GGUF allocation takes GGUF tensor types as candidates")
    if method not in ("rtn", "gptq"):
        raise ValueError(f"GGUF allocation fits its blocks by rtn (the importance search) or gptq, not {method!r}")
    start = time.perf_counter()
    budget, budget_bits, _ = gguf_budget(model, tokenizer, target)
    params = _gguf_params(model)
    table = measure_sensitivity(model, calibration, lambda n: candidates, list(params), windows=windows,
                                method=method, gptq_windows=gptq_windows, progress=progress)
    choices = _choose(table, budget_bits, budget)
    return Allocation(budget, budget_bits, budget.size_bytes - budget_bits // 8, choices,
                      {n: t.skipped for n, t in table.items()}, time.perf_counter() - start,
                      gguf_types={params[c.name]: c.candidate for c in choices})

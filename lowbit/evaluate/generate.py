"""Text generation with a KV cache, and the speed a user gets from it.

``generate`` is one prefill forward over the prompt, then one forward per new token, keeping only the
last position's logits (a 49152-entry vocabulary times a 512-token prompt would be 100 MB of logits
nobody reads). Two loops run it (``LOOPS``): "transformers", the model's own forward over a growing
``DynamicCache``, for every model; "lean" (``lowbit.evaluate.lean_decode``), the same weights in a
plain loop with fused decode ops, for the Llama-family float32 models it covers. "auto" takes the
lean loop where it applies. ``bench_speed`` times either loop on fixed-seed random prompt tokens, so
the float model and its quantized versions are compared through one loop, on the same tokens, with
the same threads.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lowbit.evaluate.lean_decode import lean_decoder, lean_decoder_support
from lowbit.evaluate.speed import huge_page_bytes, peak_rss_bytes

LOOPS = ("auto", "lean", "transformers")


@dataclass
class Generation:
    """What ``generate`` produced and how long each phase took.

    ``tokens``: the new token ids (prompt excluded). ``prefill_seconds``: the prompt's forward pass.
    ``decode_seconds``: each new token's forward after the first (whose logits came from prefill).
    ``loop``: the loop that ran ("lean" or "transformers").
    """

    tokens: list[int] = field(default_factory=list)
    loop: str = "transformers"
    prompt_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: list[float] = field(default_factory=list)

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else float("inf")

    @property
    def decode_tokens_per_second(self) -> float:
        total = sum(self.decode_seconds)
        return len(self.decode_seconds) / total if total > 0 else float("inf")


def set_threads(threads: int | None) -> int:
    """Use ``threads`` CPU threads for torch's kernels (None: leave as is); returns the count in force.

    Raises:
        ValueError: ``threads`` < 1.
    """
    if threads is not None:
        if not isinstance(threads, int) or threads < 1:
            raise ValueError(f"the thread count must be an integer >= 1, got {threads!r}")
        torch.set_num_threads(threads)
    return torch.get_num_threads()


@torch.inference_mode()
def generate(model: nn.Module, input_ids: Tensor, max_new_tokens: int, *, eos_token_id: int | list[int] | None = None,
             on_token: Callable[[int], None] | None = None, temperature: float = 0.0, seed: int = 0,
             loop: str = "auto") -> Generation:
    """Continue ``input_ids`` (int64 ``[1, n]``) by up to ``max_new_tokens`` tokens.

    Greedy when ``temperature`` is 0, else sampled from ``softmax(logits / temperature)`` with a
    generator seeded by ``seed`` (the same seed gives the same tokens). Stops after an ``eos_token_id``.
    ``on_token`` is called with each new token id as soon as it is chosen (streaming). ``loop``: one of
    ``LOOPS`` (see the module's docstring).

    Raises:
        ValueError: an empty prompt, a batch of more than one sequence, ``max_new_tokens`` < 1, a
            negative temperature, more tokens in all than the model's context, an unknown ``loop``,
            or ``loop="lean"`` for a model it does not cover (the line says why).
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] == 0:
        raise ValueError(f"generate takes one non-empty prompt, int64 [1, n]; got shape {tuple(input_ids.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if context is not None and input_ids.shape[1] + max_new_tokens > context:
        raise ValueError(f"{input_ids.shape[1]} prompt tokens + {max_new_tokens} new ones exceed the model's context "
                         f"of {context}; ask for fewer tokens")
    step = _Step(model, resolve_loop(model, loop), input_ids.shape[1] + max_new_tokens)
    stop = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    sampler = torch.Generator().manual_seed(seed)
    result = Generation(prompt_tokens=input_ids.shape[1], loop=step.loop)
    start = time.perf_counter()
    logits = step(input_ids)
    result.prefill_seconds = time.perf_counter() - start
    while True:
        token = _choose(logits, temperature, sampler)
        result.tokens.append(token)
        if on_token is not None:
            on_token(token)
        if token in stop or len(result.tokens) == max_new_tokens:
            return result
        start = time.perf_counter()
        logits = step(torch.tensor([[token]], device=input_ids.device))
        result.decode_seconds.append(time.perf_counter() - start)


def resolve_loop(model: nn.Module, loop: str) -> str:
    """The loop ``generate`` runs for ``loop`` ("auto": lean where it applies).

    Raises:
        ValueError: an unknown ``loop``, or "lean" for a model it does not cover.
    """
    if loop not in LOOPS:
        raise ValueError(f"loop must be one of {', '.join(LOOPS)}, got {loop!r}")
    if loop == "transformers":
        return loop
    reason = lean_decoder_support(model)
    if reason is not None and loop == "lean":
        raise ValueError(f"{reason}; use the transformers loop")
    return "lean" if reason is None else "transformers"


class _Step:
    """``ids [1, n] -> logits [1, vocab]`` of the last position, appending to one KV cache."""

    def __init__(self, model: nn.Module, loop: str, max_length: int) -> None:
        self.loop = loop
        if loop == "lean":
            self.forward = lean_decoder(model, max_length)
        else:
            from transformers import DynamicCache

            cache = DynamicCache(config=getattr(model, "config", None))
            self.forward = lambda ids: model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]

    def __call__(self, ids: Tensor) -> Tensor:
        return self.forward(ids)



def _choose(logits: Tensor, temperature: float, sampler: torch.Generator) -> int:
    if temperature <= 0:
        return int(logits.argmax(-1))
    probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=sampler))


def bench_speed(model: nn.Module, *, prompt_tokens: int = 128, new_tokens: int = 64, repeats: int = 3,
                seed: int = 0, loop: str = "auto") -> dict[str, Any]:
    """Prefill and decode tokens/s of ``generate`` on ``prompt_tokens`` fixed-seed random ids, greedy,
    never stopping early; the best of ``repeats`` runs after one untimed warm-up (the machine's noise only
    ever slows a run down). Also the loop, the threads used, the process's peak resident memory and its
    memory in huge pages (None where the OS does not say)."""
    if prompt_tokens < 1 or new_tokens < 2 or repeats < 1:
        raise ValueError(f"prompt_tokens >= 1, new_tokens >= 2 and repeats >= 1 needed, got "
                         f"{prompt_tokens}, {new_tokens}, {repeats}")
    vocab = model.get_output_embeddings().out_features
    ids = torch.randint(0, vocab, (1, prompt_tokens), generator=torch.Generator().manual_seed(seed))
    loop = resolve_loop(model, loop)
    generate(model, ids[:, :8], 2, loop=loop)  # warm-up: allocator, lazy initialisation, kernel dispatch
    runs = [generate(model, ids, new_tokens, loop=loop) for _ in range(repeats)]
    huge = huge_page_bytes()
    return {
        "loop": loop,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "prefill_tokens_per_second": max(r.prefill_tokens_per_second for r in runs),
        "decode_tokens_per_second": max(r.decode_tokens_per_second for r in runs),
        "threads": torch.get_num_threads(),
        "peak_rss_mib": peak_rss_bytes() / 2**20,
        "huge_pages_mib": None if huge is None else huge / 2**20,
        "runs": [{"prefill_tokens_per_second": r.prefill_tokens_per_second,
                  "decode_tokens_per_second": r.decode_tokens_per_second} for r in runs],
    }

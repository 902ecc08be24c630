"""Run a GGUF file with llama.cpp, the reference GGUF runtime, to verify lowbit's exports.

An exported file is correct when llama.cpp loads it and scores text like the model it came from,
so these helpers expose exactly what such a check needs: per-token logits of token windows and a
greedy completion. They go through ``llama-cpp-python``, an optional dependency that compiles
llama.cpp from source when installed (``pip install 'lowbit[llama-cpp]'``); ``llama_cpp`` is
therefore imported inside the functions and its absence raises ``ImportError`` with that fix.

llama.cpp's own logging is kept off stderr (``verbose=False``); errors still surface as
exceptions from ``llama_cpp``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["LlamaCppModel", "llama_cpp_generate", "llama_cpp_logits", "llama_cpp_version"]

_INSTALL_HINT = "llama.cpp is not installed; install it with: pip install 'lowbit[llama-cpp]'"


def _llama_cpp() -> Any:
    """The ``llama_cpp`` module, or ``ImportError`` telling the user how to install it."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise ImportError(_INSTALL_HINT) from exc
    return llama_cpp


def llama_cpp_version() -> str:
    """Version of the installed ``llama-cpp-python``; each release pins one llama.cpp commit.

    Raises ``ImportError`` when llama-cpp-python is not installed.
    """
    return str(_llama_cpp().__version__)


def _model_path(gguf_path: str | os.PathLike[str]) -> str:
    """``gguf_path`` as a string after checking the file exists (llama.cpp's own error is vague)."""
    path = os.fspath(gguf_path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    return path


def _check_threads(n_threads: int | None) -> None:
    if n_threads is not None and n_threads < 1:
        raise ValueError(f"n_threads must be at least 1 (or None for the default), got {n_threads}")


def llama_cpp_logits(
    gguf_path: str | os.PathLike[str],
    windows: Sequence[Sequence[int]],
    n_threads: int | None = None,
) -> Iterator[np.ndarray]:
    """Yield llama.cpp's logits for each token window, each window evaluated from scratch.

    ``windows`` are lists of token ids in the model's vocabulary (lengths may differ); nothing is
    prepended, so add BOS yourself when the model needs it. For window ``w`` the yielded array
    has shape ``[len(w), n_vocab]``, dtype float32, and row ``t`` is the next-token logits after
    ``w[:t+1]``, as Hugging Face's ``model(ids).logits[0]``. The KV cache is cleared between
    windows; the context and batch are the longest window, so one window is one forward pass.
    The model loads once, on the first ``next()``, and is freed when the iterator is exhausted
    or closed. ``n_threads`` defaults to llama-cpp-python's choice (half the CPUs for single
    tokens, all of them for batches). ggml's threads spin at barriers, so on cores shared with
    other busy processes use 1: there 2 threads ran 3-4x slower than 1.

    Raises ``ValueError`` for an empty window list, an empty window or an id outside the
    vocabulary, ``FileNotFoundError`` for a missing file and ``ImportError`` without llama.cpp.
    """
    path = _model_path(gguf_path)
    if len(windows) == 0:
        raise ValueError("windows is empty; pass at least one list of token ids")
    if any(len(w) == 0 for w in windows):
        raise ValueError("every window needs at least one token id; got an empty window")
    _check_threads(n_threads)
    _llama_cpp()  # ImportError with the fix now, not at the first next()
    return _logits(path, [[int(t) for t in w] for w in windows], n_threads)


def _logits(path: str, windows: list[list[int]], n_threads: int | None) -> Iterator[np.ndarray]:
    """Generator behind :func:`llama_cpp_logits` (arguments already checked)."""
    model = LlamaCppModel(path, n_ctx=max(len(w) for w in windows), n_threads=n_threads)
    try:
        n_vocab = model.n_vocab()
        for w in windows:
            bad = [t for t in w if not 0 <= t < n_vocab]
            if bad:
                raise ValueError(f"token id {bad[0]} is outside the model's vocabulary [0, {n_vocab})")
            yield model.window_logits(w)
    finally:
        model.close()


def llama_cpp_generate(
    gguf_path: str | os.PathLike[str],
    prompt: str,
    max_tokens: int,
    n_threads: int | None = None,
) -> str:
    """Greedy completion of ``prompt`` by llama.cpp: at most ``max_tokens`` new tokens, as text.

    Greedy (temperature 0, no repetition penalty) makes the output deterministic for a given
    file and llama.cpp build. The prompt is tokenized by llama.cpp with the GGUF's own rule for
    BOS. ``n_threads`` as in :func:`llama_cpp_logits`. Raises ``ValueError`` if
    ``max_tokens < 1``, ``FileNotFoundError`` for a missing file and ``ImportError`` without
    llama.cpp.
    """
    path = _model_path(gguf_path)
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
    _check_threads(n_threads)
    llama_cpp = _llama_cpp()
    # A prompt has at most one token per UTF-8 byte, plus BOS: this context always fits.
    n_ctx = len(prompt.encode("utf-8")) + max_tokens + 2
    llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_threads=n_threads, n_threads_batch=n_threads,
                          verbose=False)
    try:
        out = llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0, repeat_penalty=1.0)
    finally:
        llm.close()
    return str(out["choices"][0]["text"])


class LlamaCppModel:
    """A GGUF file run by llama.cpp, callable like a model: ``model(ids [batch, time]) -> logits``.

    This lets ``lowbit.evaluate.evaluate_windows`` score a file with llama.cpp itself (perplexity,
    and KL / top-1 against any reference, torch or llama.cpp), each row evaluated from scratch.
    ``n_ctx`` must cover the longest input (the window plus BOS when one is prepended).
    """

    def __init__(self, gguf_path: str | os.PathLike[str], n_ctx: int, n_threads: int | None = 1) -> None:
        """Context and batch are both ``n_ctx``, so one window is one forward pass."""
        _check_threads(n_threads)
        if n_ctx < 1:
            raise ValueError(f"n_ctx must be at least 1, got {n_ctx}")
        self._llm = _llama_cpp().Llama(model_path=_model_path(gguf_path), n_ctx=n_ctx, n_batch=n_ctx,
                                       n_ubatch=n_ctx, logits_all=True, n_threads=n_threads,
                                       n_threads_batch=n_threads, verbose=False)
        self.n_ctx = n_ctx

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[1] > self.n_ctx:
            raise ValueError(f"inputs of {input_ids.shape[1]} tokens exceed n_ctx={self.n_ctx}")
        return torch.stack([torch.from_numpy(self.window_logits(ids)) for ids in input_ids.tolist()])

    def window_logits(self, ids: list[int]) -> np.ndarray:
        """float32 ``[len(ids), n_vocab]`` logits of one window, evaluated from an empty KV cache."""
        self._llm.reset()  # n_tokens = 0, so eval() drops every cached position first
        self._llm.eval(ids)
        return np.array(self._llm.scores[: len(ids)], dtype=np.float32, copy=True)

    def n_vocab(self) -> int:
        return int(self._llm.n_vocab())

    def close(self) -> None:
        self._llm.close()

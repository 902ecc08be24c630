"""Calibration windows: random slices of real text that GPTQ-style methods run the model on.

The sampling is IST-DASLab/gptq's ``get_wikitext2``: tokenize the whole text once, then take
``samples`` windows of ``seqlen`` tokens at random start offsets (they may overlap). Offsets come
from ``torch.Generator().manual_seed(seed)``, so a seed gives the same windows on every machine.

``generated_windows`` draws windows from the model itself instead (self-calibration): text in the
model's own distribution, not the one domain a calibration file holds.

The default text is WikiText-2 *validation* (``wikitext-2/valid.txt`` under ``default_data_dir()``,
else ``datasets``' ``wikitext-2-raw-v1`` where the hub is reachable), disjoint from the test split
that perplexity is measured on, cleaned of v1's ``<unk>`` and ``@-@`` markers (``clean_wikitext``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.evaluate.text import DATA_ENV_VAR, default_data_dir, read_text, tokenize

_CALIB_RELPATH = Path("wikitext-2") / "valid.txt"


def default_calibration_path() -> Path:
    """Path of the default calibration text, WikiText-2 validation (``wikitext-2/valid.txt``)."""
    return default_data_dir() / _CALIB_RELPATH


def calibration_text(path: str | Path | None = None) -> str:
    """The calibration text: one file, or every ``.txt`` file of a directory in sorted order.

    Files are read with ``read_text`` (lines joined by ``"\\n\\n"``, as for evaluation); the files
    of a directory are joined with ``"\\n\\n"`` too.

    Raises:
        FileNotFoundError: ``path`` does not exist, a directory holds no ``.txt`` file, or
            ``path`` is None and the default text is missing.
    """
    if path is None:
        p = default_calibration_path()
        if p.is_file():
            return clean_wikitext(read_text(p))
        return clean_wikitext(_wikitext_validation_from_datasets(p))
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix == ".txt" and f.is_file())
        if not files:
            raise FileNotFoundError(f"calibration directory {p} holds no .txt files; pass --calib FILE or add some")
        return "\n\n".join(read_text(f) for f in files)
    if not p.is_file():
        raise FileNotFoundError(f"calibration text not found: {p}; pass --calib PATH to an existing file or directory")
    return read_text(p)


def clean_wikitext(text: str) -> str:
    """Undo WikiText-2 v1's tokenization artefacts that no real text contains.

    The v1 files split hyphens and number separators into ``" @-@ "``, ``" @,@ "``, ``" @.@ "`` and
    replace rare words by ``"<unk>"`` (about one token in eight of SmolLM2's tokenization of the
    validation split). Calibrating on those teaches the statistics of markers the model never sees
    in use, so the separators are re-joined and ``<unk>`` is dropped. Applied to the default text
    only; a user's ``--calib`` file is used as written.
    """
    for marker, char in ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", ".")):
        text = text.replace(marker, char)
    return text.replace(" <unk>", "").replace("<unk>", "")


def _wikitext_validation_from_datasets(missing: Path) -> str:
    """WikiText-2 validation through ``datasets`` (network), or a FileNotFoundError saying what to do."""
    try:
        from datasets import load_dataset

        rows = load_dataset("wikitext", "wikitext-2-raw-v1", split="validation")["text"]
    except Exception as exc:  # not installed, offline, hub refused: all mean "no default text here"
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        raise FileNotFoundError(
            f"default calibration text not found: {missing}, and `datasets` could not provide WikiText-2 "
            f"validation ({reason}); pass --calib PATH (a text file or a directory of .txt files) or set "
            f"${DATA_ENV_VAR} to the directory holding wikitext-2/"
        ) from None
    return "\n\n".join(line.strip() for line in rows if line.strip())


def calibration_windows(tokenizer: Any, *, path: str | Path | None = None, samples: int = 128,
                        seqlen: int = 512, seed: int = 0, max_context: int | None = None,
                        bos_id: int | None = None) -> torch.LongTensor:
    """``samples`` random windows of ``seqlen`` token ids, int64 ``[samples, seqlen]``.

    Args:
        tokenizer: a Hugging Face tokenizer or a ``tokenizers.Tokenizer``; no special tokens are added.
        path: a text file or a directory of ``.txt`` files; None for WikiText-2 validation.
        samples: number of windows (GPTQ's ``nsamples``; 128 in the paper).
        seqlen: tokens per window (the paper uses the model's context, 2048).
        seed: seeds the start offsets; the result is a function of (text, tokenizer, samples,
            seqlen, seed) only.
        max_context: the model's context length (``max_position_embeddings``); None skips the check.
        bos_id: for models that need BOS at the start of every sequence (Gemma; ``needs_bos``):
            each window is BOS followed by ``seqlen - 1`` text tokens, as the model sees text in use.

    Raises:
        FileNotFoundError: see ``calibration_text``.
        ValueError: ``samples`` or ``seqlen`` < 1, ``seqlen`` > ``max_context``, or the text is
            shorter than one window.
    """
    if samples < 1:
        raise ValueError(f"calibration needs at least 1 sample, got samples={samples}")
    if seqlen < 1:
        raise ValueError(f"calibration windows need at least 1 token, got seqlen={seqlen}")
    if max_context is not None and seqlen > max_context:
        raise ValueError(f"calibration windows of {seqlen} tokens exceed the model's context of {max_context}; "
                         f"use --calib-seqlen <= {max_context}")
    ids = torch.tensor(tokenize(calibration_text(path), tokenizer), dtype=torch.long)
    if ids.numel() < seqlen:
        raise ValueError(f"calibration text has {ids.numel()} tokens, fewer than one window of {seqlen}; "
                         "use a smaller --calib-seqlen or a longer --calib text")
    generator = torch.Generator().manual_seed(seed)
    text_len = seqlen if bos_id is None else seqlen - 1
    # IST draws i in [0, n - seqlen - 1]; the last full window (start n - seqlen) is allowed here.
    starts = torch.randint(0, ids.numel() - text_len + 1, (samples,), generator=generator)
    windows = ids[starts[:, None] + torch.arange(text_len)]
    if bos_id is None:
        return windows
    return torch.cat([torch.full((samples, 1), bos_id, dtype=torch.long), windows], dim=1)


def generation_start_id(tokenizer: Any) -> int:
    """The token ``generated_windows`` starts each sample from: BOS, else EOS (a document boundary).

    Raises:
        ValueError: the tokenizer has neither.
    """
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise ValueError("--calib-generated needs a BOS or EOS token to start the samples from; this tokenizer has "
                         "neither: calibrate on text (--calib)")
    return start


@torch.no_grad()
def generated_windows(model: nn.Module, samples: int, seqlen: int, *, start_id: int, seed: int = 0,
                      batch_size: int = 32) -> torch.LongTensor:
    """``samples`` windows of ``seqlen`` token ids sampled from ``model`` itself, int64 ``[samples, seqlen]``.

    Each window is ``start_id`` (the BOS token, or whatever a document starts with) followed by
    ``seqlen - 1`` tokens drawn one by one at temperature 1 from the model's own next-token
    distribution (a KV cache, ``batch_size`` windows at a time). Why: a calibration file holds one
    domain, and statistics fitted to it need not hold elsewhere (GPTQ fitted to WikiText keeps 13% of
    its in-domain KL reduction on Python source, ``bench/results/calibration_ood_*``); the model's
    own samples cover the mixture it was trained on (self-calibration, as in LLM-QAT's data-free
    distillation). Use the float model: a quantized one would calibrate on its own errors.

    Deterministic: the draws come from a CPU ``torch.Generator`` seeded with ``seed``; the same
    model, arguments and seed give the same windows.

    Raises:
        ValueError: ``samples`` or ``seqlen`` < 1, or ``batch_size`` < 1.
    """
    from transformers import DynamicCache

    if samples < 1 or seqlen < 1 or batch_size < 1:
        raise ValueError(f"generated calibration needs samples, seqlen and batch size >= 1, got "
                         f"{samples}, {seqlen}, {batch_size}")
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    out = []
    for first in range(0, samples, batch_size):
        n = min(batch_size, samples - first)
        tokens = [torch.full((n, 1), start_id, dtype=torch.long)]
        cache = DynamicCache(config=getattr(model, "config", None))
        for _ in range(seqlen - 1):
            logits = model(input_ids=tokens[-1].to(device), cache=cache, use_cache=True, logits_to_keep=1).logits
            probs = torch.softmax(logits[:, -1].float().cpu(), dim=-1)
            tokens.append(torch.multinomial(probs, 1, generator=generator))
        out.append(torch.cat(tokens, dim=1))
    model.train(was_training)
    return torch.cat(out)

"""Evaluation text: where it lives, how it is read, and how it is cut into windows.

Perplexity numbers are only comparable when every tool reads the same text the same way, so
this module pins down the project's protocol (see ``shared/data/README.md``):

* the text is read as UTF-8, split into lines and the lines are joined with ``"\\n\\n"`` (the
  way the rows of the Hugging Face ``wikitext-2-raw-v1`` split are usually joined);
* the whole text is tokenized once, with the model's own tokenizer and no special tokens;
* the ids are cut into non-overlapping windows of ``L`` tokens, ``ids[w*L:(w+1)*L]``, keeping
  the first ``N`` complete windows (an incomplete last window is dropped).

Tokenizing once (instead of per line or per window) matters: it decides where token boundaries
fall, and a different rule gives a measurably different perplexity.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["DATA_ENV_VAR", "default_data_dir", "default_eval_path", "read_text", "read_utf8", "tokenize", "token_windows"]

#: Environment variable naming the directory that holds ``wikitext-2-raw/``, ``wikitext-2/`` and
#: ``tinyshakespeare/``; it overrides the default ``<repo>/../shared/data``.
DATA_ENV_VAR = "LOWBIT_DATA"

_EVAL_RELPATH = Path("wikitext-2-raw") / "wiki.test.raw"


def default_data_dir() -> Path:
    """Directory holding the evaluation/calibration texts.

    ``$LOWBIT_DATA`` wins when set, so an installed package (whose source is not next to the
    shared data) can still find the files; otherwise ``shared/data`` beside the repository root.
    """
    env = os.environ.get(DATA_ENV_VAR)
    if env:
        return Path(env).expanduser()
    # parents[0] = lowbit/evaluate, parents[1] = lowbit, parents[2] = repository root.
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


def default_eval_path() -> Path:
    """Path of the standard perplexity text, WikiText-2 raw test split (``wiki.test.raw``)."""
    return default_data_dir() / _EVAL_RELPATH


def read_text(path: str | os.PathLike[str]) -> str:
    """Read an evaluation text and join its lines with ``"\\n\\n"`` as the protocol requires.

    Raises ``FileNotFoundError`` with a hint when the file is missing (the data is deliberately
    not shipped with the package), ``ValueError`` naming the file when it is not UTF-8.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"evaluation text not found: {p} (set ${DATA_ENV_VAR} to the directory holding "
            "wikitext-2-raw/, or, with network access, get the same text from `datasets`: "
            "load_dataset('wikitext', 'wikitext-2-raw-v1', split='test'))"
        )
    return "\n\n".join(read_utf8(p).splitlines())


def read_utf8(path: Path) -> str:
    """The text of ``path``, which must be UTF-8.

    Raises:
        ValueError: it is not UTF-8, naming the file and the first bad byte (the codec's own error
            names neither the file nor what to do).
    """
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"text file {path} is not UTF-8 (byte {e.start}: {e.reason}); convert it, e.g. with "
                         "iconv -t utf-8") from None


def tokenize(text: str, tokenizer: Any) -> list[int]:
    """Token ids of ``text`` with no special tokens (no BOS/EOS added by the tokenizer).

    Accepts a Hugging Face tokenizer (``encode`` returns a list) or a ``tokenizers.Tokenizer``
    (``encode`` returns an ``Encoding`` with ``.ids``).
    """
    encoded = tokenizer.encode(text, add_special_tokens=False)
    ids = getattr(encoded, "ids", encoded)
    return [int(i) for i in ids]


def token_windows(
    text: str,
    tokenizer: Any,
    seqlen: int,
    max_windows: int | None = None,
    max_context: int | None = None,
) -> torch.LongTensor:
    """Cut ``text`` into non-overlapping windows of ``seqlen`` token ids, shape ``[n, seqlen]``.

    Window ``w`` is ``ids[w*seqlen:(w+1)*seqlen]`` of the whole text tokenized once; the first
    ``max_windows`` complete windows are kept (all of them when ``None``), and an incomplete
    trailing window is dropped so every window is scored on the same footing. ``max_context`` is
    the model's context length (``max_position_embeddings``): a longer window would be scored past
    the positions the model was trained on, a number that means nothing; None skips the check.
    """
    if seqlen < 1:
        raise ValueError(f"seqlen must be at least 1, got {seqlen}")
    if max_context is not None and seqlen > max_context:
        raise ValueError(f"windows of {seqlen} tokens exceed the model's context of {max_context}; "
                         f"use --seqlen <= {max_context}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be at least 1 (or None for all), got {max_windows}")
    if not text or not text.strip():
        raise ValueError("evaluation text is empty")
    ids = tokenize(text, tokenizer)
    n = len(ids) // seqlen
    if n == 0:
        raise ValueError(
            f"evaluation text has {len(ids)} tokens, fewer than one window of {seqlen}; "
            "use a smaller --seqlen or a longer text"
        )
    if max_windows is not None:
        n = min(n, max_windows)
    return torch.tensor(ids[: n * seqlen], dtype=torch.long).view(n, seqlen)

"""Refuse a truncated or corrupt ``.gguf`` file with one clear line, before anything parses it deeply."""

from __future__ import annotations

import os
import struct
from pathlib import Path


def check_gguf(path: str | os.PathLike[str]) -> None:
    """Read ``path``'s header and tensor table and check every tensor's bytes are in the file.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a GGUF file, or truncated/corrupt (the message says which and what to do).
    """
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file (it does not start with the GGUF magic)")
    try:
        reader = GGUFReader(path)
        short = [t.name for t in reader.tensors if t.data.nbytes != t.n_bytes]
    except (struct.error, ValueError, IndexError, KeyError, OSError) as e:
        raise ValueError(f"{path} is truncated or corrupt ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                         "re-download or re-export it") from None
    if short:
        raise ValueError(f"{path} is truncated: tensor {short[0]} (and {len(short) - 1} more) extends past the end "
                         "of the file; re-download or re-export it")

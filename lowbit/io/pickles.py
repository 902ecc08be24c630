"""lowbit reads weights from safetensors only: a pickle file is refused unless the user allows it.

Unpickling can run code. torch's restricted loader (``weights_only=True``), which transformers and
peft use for ``pytorch_model.bin`` and ``adapter_model.bin``, narrows that but still parses an
untrusted format; "no pickle" is meant literally, so a directory whose weights would come from a
pickle is refused before anything reads it, with the safetensors alternative named. Both loaders
prefer ``*.safetensors`` when a directory has them, so only a directory without any is at stake.
"""

from __future__ import annotations

from pathlib import Path

# Suffixes of the pickle files transformers, peft and torch.save write weights and states to.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def check_no_pickle(directory: str | Path, *, allow_pickle: bool) -> None:
    """Refuse ``directory`` when its weights would be read from a pickle file: it holds no
    ``*.safetensors`` and a file with a ``PICKLE_SUFFIXES`` suffix. ``allow_pickle`` lets it through.

    Raises:
        ValueError: one line naming the pickle file, the safetensors alternative and the flag.
    """
    directory = Path(directory)
    if allow_pickle or not directory.is_dir() or any(directory.glob("*.safetensors")):
        return
    pickles = sorted(p for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
    if pickles:
        raise ValueError(f"{pickles[0]} is a pickle file, which lowbit does not read (unpickling can run code); "
                         "convert it to safetensors (save_pretrained(..., safe_serialization=True) where you trust "
                         "it) or pass --allow-pickle (allow_pickle=True) if you trust the file")

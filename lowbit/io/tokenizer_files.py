"""A model's tokenizer, loaded or refused with one line naming the model.

The tokenizers library raises a bare ``Exception`` for a ``tokenizer.json`` it cannot parse, and
tokenizer files sit outside a checkpoint's manifest (``lowbit.io.manifest``), so a truncated or
edited one reaches the loader; this is where it becomes a ``ValueError`` like every other bad file.
"""

from __future__ import annotations

from typing import Any


def load_tokenizer(name_or_path: str, where: str, **kwargs: Any) -> Any:
    """``AutoTokenizer.from_pretrained(name_or_path, **kwargs)``.

    Raises:
        ValueError: the tokenizer files cannot be read, naming ``where`` and the cause.
    """
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    except Exception as e:  # tokenizers raises plain Exception; transformers OSError, ValueError, KeyError ...
        cause = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
        raise ValueError(f"the tokenizer of {where} cannot be loaded ({type(e).__name__}: {cause}); its tokenizer "
                         "files are corrupt or missing, re-copy them") from None

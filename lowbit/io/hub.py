"""Whether the Hugging Face hub can be reached, asked once before a hub id is loaded.

Where it cannot (often, where lowbit runs), huggingface_hub retries every request with a backoff:
``lowbit quantize someorg/somemodel`` printed 22 retry lines over 50 s before its error. One TCP
connect with a short timeout settles it first; unreachable, the load runs with
``local_files_only=True``, so a model in the hub cache still loads and any other fails at once.
"""

from __future__ import annotations

import os
import socket
from typing import Any
from urllib.parse import urlparse

CONNECT_TIMEOUT_S = 3.0  # a reachable hub answers a TCP connect in well under a second


def hub_reachable() -> bool:
    """Whether a TCP connection to the hub's endpoint (``HF_ENDPOINT``, default huggingface.co)
    opens within ``CONNECT_TIMEOUT_S``; False without asking when ``HF_HUB_OFFLINE`` is set."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError:
        return False
    return True


def hub_kwargs() -> dict[str, Any]:
    """``from_pretrained`` keywords for loading a hub id: when the hub cannot be reached
    (``hub_reachable``), ``local_files_only``, so transformers reads the cache instead of retrying;
    also in ``adapter_kwargs``, since transformers looks for a PEFT adapter without passing it on."""
    if hub_reachable():
        return {}
    return {"local_files_only": True, "adapter_kwargs": {"local_files_only": True}}


def unreachable_reason(kwargs: dict[str, Any], error: BaseException) -> str | None:
    """Why loading a hub id failed when ``kwargs`` (from ``hub_kwargs``) kept it to the cache and
    ``error`` says a file was not there; None otherwise (the error says it better)."""
    if not (kwargs.get("local_files_only") and isinstance(error, OSError)):
        return None
    from huggingface_hub import constants

    return (f"the hub ({constants.ENDPOINT}) cannot be reached and the model is not in the cache "
            f"({constants.HF_HUB_CACHE}); pass a local directory, a .gguf file or a demo name")

"""A model directory's ``config.json``, read as a mapping or refused with one line naming the file.

Every reader of ``config.json`` (the checkpoint loader, its manifest, the source loader's checks
before transformers sees the directory) goes through ``read_config_json``, so a file that is not
UTF-8, not JSON or not an object is refused the same way everywhere, with its path, instead of as
a ``JSONDecodeError`` or an ``AttributeError`` from whichever reader met it first.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CONFIG_NAME = "config.json"


def read_config_json(directory: str | Path) -> dict[str, Any]:
    """The parsed ``config.json`` of ``directory``.

    Raises:
        FileNotFoundError: there is none.
        ValueError: it is not UTF-8 JSON holding an object (one line naming the file and the cause).
    """
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        config = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start}); it is corrupt, re-create or re-copy it") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); "
                         "it is corrupt or was edited, re-create or re-copy it") from None
    except RecursionError:
        raise ValueError(f"{path} nests too deeply to be a model config; it is corrupt") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a JSON {type(config).__name__}, not an object; it is not a model config")
    return config

"""Writing a benchmark's results: rows in JSON and a Markdown table beside it, each written to a
temporary name and renamed, so a run stopped part-way leaves the last complete pair, never a torn file.
Imported from the scripts' own directory (``sys.path[0]``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_results(out: Path, payload: dict[str, Any], table: list[str]) -> None:
    """``payload`` as ``out`` (JSON) and the lines of ``table`` as ``out`` with suffix ``.md``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for path, text in ((out, json.dumps(payload, indent=2) + "\n"), (out.with_suffix(".md"), "\n".join(table) + "\n")):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)

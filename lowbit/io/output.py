"""The one check every writer makes before work starts: is the output path free?"""

from __future__ import annotations

from pathlib import Path


def check_output(path: str | Path, overwrite: bool) -> None:
    """Refuse to write over an existing file or directory unless asked to.

    Callers check before slow work (loading, quantizing), so an existing output costs the user
    nothing; writers then build the output beside ``path`` and rename it into place.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        kind = "directory" if path.is_dir() else "file"
        raise FileExistsError(f"output {kind} {path} already exists; choose another path or pass --overwrite")

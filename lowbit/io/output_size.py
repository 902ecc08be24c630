"""How many bytes an output will take, estimated before the slow work that writes it (issue 16, part 6).

A full disk used to show up minutes into a run, when the writer hit it; a command now estimates
what it will write (``expected_bytes``: the source's parameter count times the bits each weight
takes, plus a margin) and ``lowbit.io.output.reserve_output`` refuses at once when the output's
filesystem has less free (``check_free_space``).

The estimate is a floor, never a guess on the high side: a check that refuses a run which would
have fit is worse than none. Layers kept in float, tokenizer files and metadata only add to it,
and a source whose parameters cannot be counted cheaply (a hub id, a demo model not pulled yet, a
file that does not parse, which the loader reports in its own words) gets no check.
"""

from __future__ import annotations

import math
from pathlib import Path

MARGIN = 1.05  # per-group scales and zero-points: 16 bits per 32 weights is 1/16 of 8-bit codes' bytes, at most
MARGIN_BYTES = 1 << 20  # config.json, the manifest, headers


def expected_bytes(parameters: int | None, bits: float) -> int | None:
    """The least an output of ``parameters`` weights at ``bits`` each takes, with ``MARGIN``; None
    when the parameters are unknown."""
    if parameters is None:
        return None
    return math.ceil(parameters * bits / 8 * MARGIN) + MARGIN_BYTES


def gguf_bits(type_name: str) -> float:
    """Bits per weight of GGUF file type ``type_name`` (its default tensor type: ``Q4_K`` for
    ``Q4_K_M``, whose mix moves some tensors to more bits), from gguf-py's block sizes.

    Raises:
        ValueError: an unknown type, listing the valid ones (``lowbit.gguf.mixes.file_type``).
    """
    from gguf import GGML_QUANT_SIZES

    from lowbit.gguf.mixes import file_type

    weights, size = GGML_QUANT_SIZES[file_type(type_name).default]
    return size * 8 / weights


def stored_bytes(source: str | Path) -> int | None:
    """The bytes of a model directory's ``*.safetensors``: what rewriting a lowbit checkpoint in a
    format that keeps its codes (``export`` without ``--type``) takes. None for anything else."""
    path = Path(source).expanduser()
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    return sum(f.stat().st_size for f in files) + MARGIN_BYTES if files else None


def parameter_count(source: str | Path) -> int | None:
    """How many values the tensors of model ``source`` hold, read from file headers only (no weight
    is loaded): a directory's ``*.safetensors`` (packed codes of a lowbit checkpoint count as
    stored, fewer than the weights they encode), a ``.gguf`` file's tensor table, a demo model's
    cached directory. None when that is not possible (see the module docstring)."""
    from lowbit.sources import DEMO_MODELS, lowbit_home

    path = Path(source).expanduser()
    if str(source) in DEMO_MODELS and not path.exists():
        path = lowbit_home() / "models" / str(source) / "hf"
    try:
        if path.is_dir():
            return _safetensors_count(path) or None
        if path.is_file() and path.suffix == ".gguf":
            from gguf import GGUFReader

            return sum(int(t.n_elements) for t in GGUFReader(path).tensors)
    except Exception:  # noqa: BLE001 - a file that does not parse is the loader's to report, with its name
        return None
    return None


def _safetensors_count(directory: Path) -> int:
    from safetensors import safe_open

    total = 0
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            total += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return total

"""Building and loading the compiled part of ``lowbit.kernels``.

The C++ sources in ``csrc/`` are compiled by ``torch.utils.cpp_extension`` (gcc + ninja) into
``$LOWBIT_HOME/kernels/<hash>/`` (``~/.cache/lowbit`` by default), where ``<hash>`` covers the
sources, the compiler flags and torch's version: a changed source or a new torch builds afresh,
an unchanged one loads in milliseconds. ``make setup`` builds it once (``python -m
lowbit.kernels``); otherwise the first call of ``load`` compiles (about a minute on 2 cores).
The library registers the torch operators ``torch.ops.lowbit_kernels.*``.

``LOWBIT_KERNELS=0`` disables the compiled part: everything then runs on the reference path.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

ENV_VAR = "LOWBIT_KERNELS"
SOURCE_DIR = Path(__file__).parent / "csrc"
SOURCES = ("lowbit_cpu.cpp", "decode_ops.cpp")
# AVX2 + FMA is the floor (checked before loading); AVX-512 code is selected at run time. No FMA
# contraction: the kernels reproduce the reference dequantization bit for bit.
CFLAGS = ("-O3", "-std=c++17", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-fopenmp")
LDFLAGS = ("-fopenmp",)


def source_hash() -> str:
    """Digest of every source file, the flags and torch's version: the build's cache key."""
    h = hashlib.sha256()
    for path in sorted(SOURCE_DIR.iterdir()):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    h.update(" ".join(CFLAGS + LDFLAGS).encode())
    h.update(torch.__version__.encode())
    return h.hexdigest()[:16]


def build_dir() -> Path:
    """``$LOWBIT_HOME/kernels/<hash>``: the root ``lowbit.sources.lowbit_home`` uses (not imported:
    kernels sit below the io layer)."""
    home = Path(os.environ.get("LOWBIT_HOME") or Path.home() / ".cache" / "lowbit").expanduser()
    return home / "kernels" / source_hash()


def unavailable_reason() -> str | None:
    """Why the compiled kernels cannot run in this process (None when they can), without building."""
    if os.environ.get(ENV_VAR, "1") == "0":
        return f"disabled by {ENV_VAR}=0"
    if sys.platform != "linux" or torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return f"CPU lacks AVX2 (torch reports {torch.backends.cpu.get_cpu_capability()} on {sys.platform})"
    return None


@lru_cache(maxsize=1)
def load() -> str | None:
    """Load the compiled kernels, building them first if this source hash was never built.

    Returns None on success, else one line saying why the kernels are not usable (the caller
    falls back to the reference path). Runs at most once per process.
    """
    reason = unavailable_reason()
    if reason is not None:
        return reason
    directory = build_dir()
    library = directory / "lowbit_kernels.so"
    try:
        if library.exists():
            torch.ops.load_library(str(library))
            return None
        directory.mkdir(parents=True, exist_ok=True)
        log.warning("lowbit: compiling the CPU kernels into %s (once, about a minute)", directory)
        from torch.utils import cpp_extension

        cpp_extension.load(
            name="lowbit_kernels", sources=[str(SOURCE_DIR / s) for s in SOURCES],
            extra_cflags=list(CFLAGS), extra_ldflags=list(LDFLAGS), extra_include_paths=[str(SOURCE_DIR)],
            build_directory=str(directory), is_python_module=False, verbose=False,
        )
    except (OSError, RuntimeError, ImportError, subprocess.SubprocessError) as err:  # no compiler or ninja; a failed build
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return f"not built: {first}"
    return None


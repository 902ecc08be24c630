"""Kernel layouts in transparent huge pages, many layers to one mapping.

A decode product streams every weight's codes from memory once per token. In 4 KiB pages the codes of
a small model (about 90 MB for SmolLM2-135M in int4 with an 8-bit head) span over 20,000 pages, and
each page costs a TLB miss and restarts the hardware prefetcher, which stops at page boundaries. On
this project's benchmark machine (1 thread, SmolLM2 int4) that was about a quarter of the decode
time: 96 tok/s in 4 KiB pages, 125 tok/s with every allocation in huge pages (THP "always"), while
torch's float32 products gained nothing. Linux gives 2 MiB pages to anonymous memory advised
``MADV_HUGEPAGE`` under its default THP mode ("madvise"), but torch's allocator does not ask, and a
layer's layout (0.2-1 MB here) is smaller than a huge page. ``in_huge_pages`` therefore copies the
tensors of many layouts back to back into one advised mapping.

Nothing changes but where the bytes live: values, shapes and dtypes are those of the originals.
Where the OS offers no ``MADV_HUGEPAGE`` (not Linux), THP is off, or ``LOWBIT_HUGE_PAGES=0`` (to
compare, or to keep the memory in ordinary pages), the layouts come back as they are.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

import torch
from torch import Tensor

HUGE_PAGE = 2 << 20
MIN_BYTES = HUGE_PAGE  # less than one huge page of tensors gains nothing from a mapping of its own
ALIGN = 64  # each tensor starts on a cache line, as the kernels' vector loads prefer
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")

Layout = TypeVar("Layout")


def huge_pages_available() -> bool:
    """Whether advised anonymous memory can get transparent huge pages here (and they are not turned
    off by ``LOWBIT_HUGE_PAGES=0``)."""
    if os.environ.get("LOWBIT_HUGE_PAGES") == "0" or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        return "[never]" not in THP_SETTING.read_text()
    except OSError:
        return False


def in_huge_pages(layouts: Sequence[Layout]) -> list[Layout]:
    """Copies of ``layouts`` (frozen dataclasses: kernel layouts such as ``PreparedWeight``) whose CPU
    tensor fields, including tensors inside tuple fields, lie in one anonymous mapping advised
    ``MADV_HUGEPAGE`` (``tensors_in_huge_pages``); other fields are shared. Returns the layouts
    unchanged when huge pages are unavailable or their tensors total less than ``MIN_BYTES``."""
    tensors = list({id(t): t for layout in layouts for t in _tensors(layout)}.values())
    copies = tensors_in_huge_pages(tensors)
    if copies is None:
        return list(layouts)
    moved = {id(t): c for t, c in zip(tensors, copies)}
    return [_replaced(layout, moved) for layout in layouts]


def tensors_in_huge_pages(tensors: Sequence[Tensor]) -> list[Tensor] | None:
    """Copies of contiguous CPU ``tensors`` (same values, shapes and dtypes), back to back from a 2 MiB
    boundary in one anonymous mapping advised ``MADV_HUGEPAGE``, each on a cache line; the mapping is
    freed with the last tensor viewing it. None when huge pages are unavailable or the tensors total
    less than ``MIN_BYTES``."""
    total = sum(_aligned(t.numel() * t.element_size()) for t in tensors)
    if total < MIN_BYTES or not huge_pages_available():
        return None
    # one huge page of slack lets the used range start on a 2 MiB boundary; untouched, it costs no memory
    region = mmap.mmap(-1, total + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(mmap.MADV_HUGEPAGE)  # before the first write, so the first faults take huge pages
    arena = torch.frombuffer(region, dtype=torch.uint8)  # keeps the mapping alive
    offset = -arena.data_ptr() % HUGE_PAGE
    copies = []
    for t in tensors:
        size = t.numel() * t.element_size()
        copy = arena[offset:offset + size].view(t.dtype).view(t.shape)
        copy.copy_(t)
        copies.append(copy)
        offset += _aligned(size)
    return copies


def _tensors(layout) -> list[Tensor]:
    found = []
    for field in dataclasses.fields(layout):
        value = getattr(layout, field.name)
        for item in value if isinstance(value, tuple) else (value,):
            if isinstance(item, Tensor) and item.device.type == "cpu" and item.is_contiguous():
                found.append(item)
    return found


def _replaced(layout: Layout, copies: dict[int, Tensor]) -> Layout:
    def moved(value):
        if isinstance(value, tuple):
            return tuple(moved(v) for v in value)
        return copies.get(id(value), value) if isinstance(value, Tensor) else value

    return dataclasses.replace(layout, **{f.name: moved(getattr(layout, f.name)) for f in dataclasses.fields(layout)
                                          if f.init})


def _aligned(size: int) -> int:
    return -(-size // ALIGN) * ALIGN

"""page_out gives a memory-mapped tensor's pages back without changing what it reads."""

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lowbit.evaluate.speed import _proc_status_kib
from lowbit.memory import page_out, return_freed_heap


def _rss_file_mib() -> int | None:
    kib = _proc_status_kib("RssFile")
    return None if kib is None else kib // 1024


def test_page_out_keeps_values_of_a_mapped_tensor_and_drops_its_pages(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_file({"w": torch.randn(2048, 4096, generator=torch.Generator().manual_seed(0))}, str(path))
    with safe_open(str(path), "pt") as f:
        mapped = f.get_tensor("w")  # a view of the file mapping, as transformers loads weights
    before = _rss_file_mib()
    expected = mapped.clone()  # every page touched
    touched = _rss_file_mib()
    advised = page_out([mapped])
    after = _rss_file_mib()
    assert torch.equal(mapped, expected)  # re-read from the file
    if advised == 0:
        pytest.skip("this kernel or C library cannot page out (MADV_PAGEOUT needs Linux >= 5.4)")
    assert advised >= 32 * 2**20 - 2 * 4096  # every whole page of the 32 MiB tensor
    if before is None or touched - before < 24:
        pytest.skip("no /proc/self/status RssFile, or the mapping was not resident")
    assert after < touched - 24  # the file was made by this process: no one else maps its pages


def test_page_out_leaves_heap_tensors_alone() -> None:
    heap = torch.arange(1 << 20, dtype=torch.float32)
    assert page_out([heap, heap[::2], torch.empty(0)]) == 0
    return_freed_heap()
    assert torch.equal(heap, torch.arange(1 << 20, dtype=torch.float32))

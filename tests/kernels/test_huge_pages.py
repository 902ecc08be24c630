"""Kernel layouts moved into one huge-page mapping: same values, same products, one advised mapping."""

import dataclasses
from pathlib import Path

import pytest
import torch

from lowbit.api import load, quantize
from lowbit.evaluate.generate import generate
from lowbit.evaluate.lean_decode import LeanDecoder
from lowbit.kernels import cpu, huge_pages, status
from lowbit.methods.rtn import quantize_rtn
from lowbit.nn import QuantLinear, prepare_kernels
from lowbit.pipeline.recipe import Recipe
from lowbit.scheme import QuantScheme

pytestmark = pytest.mark.skipif(status() is not None, reason=f"lowbit kernels unavailable: {status()}")
needs_thp = pytest.mark.skipif(not huge_pages.huge_pages_available(), reason="no transparent huge pages here")
INT4 = QuantScheme(bits=4, group_size=64, symmetric=False)


@pytest.fixture
def any_size(monkeypatch):
    monkeypatch.setattr(huge_pages, "MIN_BYTES", 0)


def _layouts(activations="float32"):
    torch.manual_seed(0)
    return [cpu.prepare(quantize_rtn(torch.randn(n, 256), INT4), activations) for n in (256, 512, 260)]


def _advised(address: int) -> bool:
    """Whether the mapping holding ``address`` was advised MADV_HUGEPAGE (VmFlags ``hg``)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(a, 16) for a in head.split("-"))
            inside = start <= address < end
        elif inside and line.startswith("VmFlags:"):
            return "hg" in line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def _tensor_fields(layout):
    return {f.name: getattr(layout, f.name) for f in dataclasses.fields(layout)
            if isinstance(getattr(layout, f.name), torch.Tensor)}


@needs_thp
@pytest.mark.parametrize("activations", ["float32", "int16"])
def test_copies_hold_the_same_values_in_one_advised_mapping(any_size, activations):
    if activations != "float32" and cpu.int8_activations_reason(INT4):
        pytest.skip(cpu.int8_activations_reason(INT4))
    before = _layouts(activations)
    after = huge_pages.in_huge_pages(before)
    pointers = []
    for old, new in zip(before, after):
        assert type(new) is type(old) and new.scheme == old.scheme and new.shape == old.shape
        for name, tensor in _tensor_fields(old).items():
            moved = getattr(new, name)
            assert moved.dtype == tensor.dtype and moved.shape == tensor.shape and torch.equal(moved, tensor)
            assert moved.data_ptr() != tensor.data_ptr() and moved.data_ptr() % huge_pages.ALIGN == 0
            pointers.append(moved.data_ptr())
    assert min(pointers) % huge_pages.HUGE_PAGE == 0  # the used range starts on a huge page
    assert all(_advised(p) for p in pointers)


@needs_thp
def test_products_are_unchanged_bit_for_bit(any_size):
    before = _layouts()
    after = huge_pages.in_huge_pages(before)
    x = torch.randn(3, 256)
    for old, new in zip(before, after):
        assert torch.equal(cpu.linear(x, new, None), cpu.linear(x, old, None))


def test_small_layouts_or_no_huge_pages_come_back_as_they_are(monkeypatch):
    layouts = _layouts()
    assert all(a is b for a, b in zip(huge_pages.in_huge_pages(layouts), layouts))  # under MIN_BYTES
    monkeypatch.setattr(huge_pages, "MIN_BYTES", 0)
    monkeypatch.setattr(huge_pages, "THP_SETTING", Path("/nonexistent/transparent_hugepage/enabled"))
    assert not huge_pages.huge_pages_available()
    assert all(a is b for a, b in zip(huge_pages.in_huge_pages(layouts), layouts))


def test_an_environment_variable_turns_them_off(monkeypatch):
    monkeypatch.setenv("LOWBIT_HUGE_PAGES", "0")
    assert not huge_pages.huge_pages_available()


@needs_thp
def test_prepared_models_and_the_lean_loop_run_from_huge_pages(any_size, tiny_llama_dir, monkeypatch):
    model, _ = load(str(tiny_llama_dir))
    quantize(model, Recipe(default=INT4), progress=False)
    prepare_kernels(model)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert layers and all(_advised(m.prepared.layout.codes.data_ptr()) for m in layers)
    stacked = [p.layout for step in LeanDecoder(model, 32).steps for p in (step.qkv, step.gate_up)]
    assert all(_advised(layout.codes.data_ptr()) for layout in stacked)
    ids = torch.randint(3, 500, (1, 12), generator=torch.Generator().manual_seed(0))
    tokens = generate(model, ids, 12, loop="lean").tokens

    monkeypatch.setattr(huge_pages, "huge_pages_available", lambda: False)  # ordinary pages: same tokens
    prepare_kernels(model)
    assert generate(model, ids, 12, loop="lean").tokens == tokens
    assert tokens == generate(model, ids, 12, loop="transformers").tokens

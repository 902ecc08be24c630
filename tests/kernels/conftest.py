"""The ``isa`` fixture: a kernel test taking it runs once under each instruction set this CPU has
(the AVX2 variant runs on AVX-512 CPUs too), and not at all where the compiled kernels are unavailable."""

import pytest
import torch

from lowbit.kernels import status


def _isas() -> list[str]:
    if status() is not None:
        return []
    return ["avx2", "avx512"] if torch.ops.lowbit_kernels.isa() == "avx512" else ["avx2"]


@pytest.fixture(params=_isas())
def isa(request):
    previous = torch.ops.lowbit_kernels.isa()
    torch.ops.lowbit_kernels.set_isa(request.param)
    yield request.param
    torch.ops.lowbit_kernels.set_isa(previous)

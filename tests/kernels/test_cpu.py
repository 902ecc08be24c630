"""The CPU kernels against the reference path, ``F.linear(x, qw.dequantize(), b)``.

The kernels decode the very float32 weights ``dequantize`` gives, so a one-hot ``x`` reads them
back bit for bit; a random ``x`` then differs from the reference by float32 summation order only.
Both instruction-set variants (AVX2, and AVX-512 where the CPU has it) run every case. Skipped,
with the reason, where the compiled kernels are unavailable (tests/kernels/test_fallback.py
covers that case).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from lowbit.kernels import linear, prepare, status, supports
from lowbit.qweight import QuantizedWeight
from lowbit.quantizer import rows_shape
from lowbit.scheme import QuantScheme

_PROBLEM = status()
pytestmark = pytest.mark.skipif(_PROBLEM is not None, reason=f"lowbit kernels unavailable: {_PROBLEM}")

FORMATS = {  # name -> scheme fields except granularity
    "int4": dict(format="int", bits=4),
    "int4-asym": dict(format="int", bits=4, symmetric=False),
    "int4-fmin": dict(format="int", bits=4, symmetric=False, zero_point="float"),
    "int8": dict(format="int", bits=8),
    "int8-asym": dict(format="int", bits=8, symmetric=False),
    "int8-fmin": dict(format="int", bits=8, symmetric=False, zero_point="float"),
    "int3": dict(format="int", bits=3),
    "int3-asym": dict(format="int", bits=3, symmetric=False),
    "int3-fmin": dict(format="int", bits=3, symmetric=False, zero_point="float"),
    "nf4": dict(format="nf4", bits=4),
    "nf4-dq": dict(format="nf4", bits=4, double_quant=True),
    "fp4": dict(format="fp4", bits=4),
    "fp4-dq": dict(format="fp4", bits=4, double_quant=True),
}
GROUPINGS = {  # name -> (granularity fields, in_features): odd sizes, groups not a multiple of 16
    "g16": (dict(group_size=16), 208),
    "g64": (dict(group_size=64), 192),
    "g128": (dict(group_size=128), 384),
    "g8": (dict(group_size=8), 200),
    "g100": (dict(group_size=100), 300),
    "channel": (dict(granularity="channel"), 77),
    "tensor": (dict(granularity="tensor"), 77),
}
OUT_FEATURES = 37
ROWS = (1, 2, 3, 4, 7, 16, 33)  # every width of the fused kernel, several passes, then the tiled GEMM path


NATIVE_ISA = None if _PROBLEM is not None else torch.ops.lowbit_kernels.isa()  # the isa fixture: conftest.py


# Groupings exercise the ISA-independent driver (padding, passes over x, tiles): every grouping
# runs under the native ISA, two under the other one.
OTHER_ISA_GROUPINGS = ("g8", "g64")


def random_weight(scheme: QuantScheme, shape: tuple[int, int], seed: int = 0, scale_range=(1e-3, 0.1)) -> QuantizedWeight:
    """Random codes, scales in ``scale_range`` and zero-points / minimums, as stored."""
    g = torch.Generator().manual_seed(seed)
    R, G = rows_shape(shape, scheme)
    codes = torch.randint(0, 2**scheme.bits, shape, dtype=torch.uint8, generator=g)
    lo, hi = scale_range
    scale = lo + (hi - lo) * torch.rand(R, G, generator=g)
    zero = None
    if not scheme.symmetric:
        if scheme.zero_point == "int":
            zero = torch.randint(0, 2**scheme.bits, (R, G), generator=g).float()
        else:
            zero = hi * (torch.rand(R, G, generator=g) - 0.5)  # within float16 range even at the largest scale
    return QuantizedWeight.from_codes(codes, scale, zero, scheme)


def assert_matches_reference(qw: QuantizedWeight, rows: tuple[int, ...], seed: int = 1, bias: bool = True) -> None:
    """``linear`` on random ``x`` of each number of ``rows`` (odd ones with a bias, when ``bias``)
    against the reference, prepared once."""
    w, prepared = qw.dequantize(), prepare(qw)
    g = torch.Generator().manual_seed(seed)
    N, K = qw.shape
    for M in rows:
        x = torch.randn(M, K, generator=g)
        b = torch.randn(N, generator=g) if bias and M % 2 else None
        got = linear(x, prepared, b)
        ref = F.linear(x, w, b)
        # Float32 summation in another order: a few ulps of sum |x| |w| (K <= 1536 here).
        bound = 64 * torch.finfo(torch.float32).eps * (F.linear(x.abs(), w.abs()) + (0 if b is None else b.abs()))
        assert got.shape == ref.shape and got.dtype == x.dtype
        excess = ((got - ref).abs() - bound).max()
        assert excess <= 0, f"M={M}: the kernel differs from the reference by {excess:.3g} beyond float32 rounding"


@pytest.mark.parametrize("grouping", GROUPINGS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_kernel_equals_the_reference(isa, fmt, grouping):
    if isa != NATIVE_ISA and grouping not in OTHER_ISA_GROUPINGS:
        pytest.skip(f"{grouping} runs under {NATIVE_ISA} only (see OTHER_ISA_GROUPINGS)")
    fields, in_features = GROUPINGS[grouping]
    scheme = QuantScheme(**FORMATS[fmt], **fields)
    assert_matches_reference(random_weight(scheme, (OUT_FEATURES, in_features)), ROWS)


@pytest.mark.parametrize("fmt", FORMATS)
def test_kernels_decode_the_reference_weights_bit_for_bit(isa, fmt):
    scheme = QuantScheme(**FORMATS[fmt], group_size=24)
    qw = random_weight(scheme, (OUT_FEATURES, 96), seed=2)
    prepared = prepare(qw)
    eye = torch.eye(96)
    w = qw.dequantize()
    assert torch.equal(linear(eye, prepared, None), w.T)  # the tiled GEMM path: one product per output
    for rows in (eye[:1], eye[5:9], eye[40:43]):  # the fused path, one to four rows at a time
        assert torch.equal(linear(rows, prepared, None), rows @ w.T)


@pytest.mark.parametrize("scale_range", [(0.0, 0.0), (2.0**-24, 2.0**-24), (65504.0, 65504.0)],
                         ids=["zero", "tiniest", "largest"])
@pytest.mark.parametrize("fmt", ["int4-asym", "int8-fmin", "int3", "nf4", "fp4"])
def test_zero_and_extreme_scales(isa, fmt, scale_range):
    scheme = QuantScheme(**FORMATS[fmt], group_size=32)
    qw = random_weight(scheme, (OUT_FEATURES, 96), seed=3, scale_range=scale_range)
    assert_matches_reference(qw, (1, 4, 20, 40), seed=4)


def test_leading_dimensions_and_low_precision_input():
    qw = random_weight(QuantScheme(bits=4, group_size=64), (OUT_FEATURES, 128))
    x = torch.randn(2, 3, 128)
    y = linear(x, prepare(qw), None)
    assert y.shape == (2, 3, OUT_FEATURES)
    torch.testing.assert_close(y, F.linear(x, qw.dequantize()), rtol=1e-5, atol=1e-5)
    y16 = linear(x.bfloat16(), prepare(qw), None)
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), F.linear(x.bfloat16().float(), qw.dequantize()), rtol=1e-2, atol=1e-2)


def test_a_layout_prepared_for_another_device_is_refused():
    prepared = prepare(random_weight(QuantScheme(bits=4, group_size=64), (OUT_FEATURES, 128)))
    elsewhere = dataclasses.replace(prepared, device=torch.device("meta"))
    with pytest.raises(ValueError, match="prepared for meta, got x on cpu"):
        linear(torch.randn(1, 128), elsewhere, None)
    with pytest.raises(ValueError, match="x has 64 features, the weight expects 128"):
        linear(torch.randn(1, 64), prepared, None)


@pytest.mark.parametrize("fields", [dict(format="int", bits=2), dict(format="int", bits=6),
                                    dict(format="fp8_e4m3", bits=8)])
def test_schemes_without_a_kernel_say_why(fields):
    scheme = QuantScheme(**fields, granularity="channel")
    assert supports(scheme) is not None
    with pytest.raises(ValueError, match="no CPU kernel"):
        prepare(random_weight(scheme, (4, 32)))
    for fmt in FORMATS.values():
        assert supports(QuantScheme(**fmt)) is None


@pytest.mark.real_model
@pytest.mark.parametrize("fields", [dict(bits=4, group_size=64, symmetric=False),
                                    dict(format="nf4", bits=4, group_size=64, double_quant=True),
                                    dict(bits=3, group_size=64, symmetric=False),
                                    dict(bits=8, granularity="channel")], ids=["int4", "nf4-dq", "int3", "int8"])
def test_a_real_smollm2_layer(fields):
    from safetensors import safe_open

    from lowbit.methods.rtn import quantize_rtn
    from lowbit.sources import pull

    with safe_open(str(pull("smollm2-135m", progress=False) / "model.safetensors"), "pt") as f:
        weight = f.get_tensor("model.layers.3.mlp.down_proj.weight").float()
    qw = quantize_rtn(weight, QuantScheme(**fields))
    assert_matches_reference(qw, (1, 4, 64), seed=5, bias=False)


def test_bf16_prefill_option_is_exact_for_decode_and_close_for_prefill():
    from lowbit.kernels import linear_bf16_prefill

    qw = random_weight(QuantScheme(bits=4, group_size=64, symmetric=False), (OUT_FEATURES, 192), seed=6)
    prepared = prepare(qw)
    torch.manual_seed(7)
    x = torch.randn(3, 192)
    assert torch.equal(linear_bf16_prefill(x, prepared, None), linear(x, prepared, None))  # decode: float32 kernels
    x = torch.randn(40, 192)
    ref = F.linear(x, qw.dequantize())
    got = linear_bf16_prefill(x, prepared, None)
    # x, W and each sum rounded to 8 significant bits: about 2**-8 of sum |x| |w| at worst.
    assert ((got - ref).abs() <= 2.0**-7 * F.linear(x.abs(), qw.dequantize().abs())).all()
    assert not torch.equal(got, linear(x, prepared, None))  # it did run in bfloat16


@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
def test_every_path_runs_under_inference_mode_on_every_thread(mode):
    from lowbit.kernels import linear_bf16_prefill

    qw = random_weight(QuantScheme(bits=4, group_size=64), (OUT_FEATURES, 128))
    prepared = prepare(qw)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with getattr(torch, mode)():
            for M in (1, 64):
                x = torch.randn(M, 128)
                torch.testing.assert_close(linear(x, prepared, None), F.linear(x, qw.dequantize()))
                linear_bf16_prefill(x, prepared, None)
    finally:
        torch.set_num_threads(threads)

"""FP8 bit-exact against torch's float8 casts; FP4 E2M1 against the OCP MX table."""

import pytest
import torch

from lowbit.formats import make_format

TORCH_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


@pytest.mark.parametrize("name", TORCH_DTYPES)
def test_decode_all_256_codes_equals_torch(name):
    codes = torch.arange(256, dtype=torch.uint8)
    ours = make_format(name, 8).decode(codes)
    ref = codes.view(TORCH_DTYPES[name]).float()
    assert torch.equal(torch.isnan(ours), torch.isnan(ref))
    assert torch.equal(ours.nan_to_num(0.0), ref.nan_to_num(0.0))
    assert torch.equal(torch.signbit(ours[~torch.isnan(ours)]), torch.signbit(ref[~torch.isnan(ref)]))


@pytest.mark.parametrize("name", TORCH_DTYPES)
def test_encode_equals_torch_cast(name):
    """Every magnitude range, exact ties (midpoints), overflow, inf, NaN and signed zero."""
    dtype = TORCH_DTYPES[name]
    grid = torch.arange(256, dtype=torch.uint8).view(dtype).float()
    finite = grid[torch.isfinite(grid)].unique()
    mids = (finite[1:] + finite[:-1]) / 2
    g = torch.Generator().manual_seed(0)
    random = torch.cat([torch.randn(20000, generator=g) * 10.0**k for k in range(-9, 7)])
    specials = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), -float("nan"), 1e30, -1e30])
    x = torch.cat([finite, mids, -mids, mids.nextafter(torch.tensor(0.0)), random, specials])
    ours = make_format(name, 8).encode(x)
    ref = x.to(dtype).view(torch.uint8)
    bad = ours != ref
    assert not bad.any(), f"{bad.sum()} mismatches, e.g. x={x[bad][:5].tolist()}"


def test_e4m3_saturates_and_e5m2_overflows_like_torch():
    e4m3, e5m2 = make_format("fp8_e4m3", 8), make_format("fp8_e5m2", 8)
    assert e4m3.round_trip(torch.tensor([1e6, float("inf")])).tolist() == [448.0, 448.0]
    assert e5m2.round_trip(torch.tensor([1e6])).isinf().all()
    assert e4m3.max_value == 448.0 and e5m2.max_value == 57344.0


def test_fp4_e2m1_table_and_ties_to_even():
    fmt = make_format("fp4", 4)
    values = fmt.decode(torch.arange(16, dtype=torch.uint8)).tolist()
    assert values[:8] == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    assert values[8:] == [-v for v in values[:8]]
    # Ties go to the even mantissa: 0.25 -> 0, 0.75 -> 1, 2.5 -> 2, 5 -> 4; beyond 6 saturates.
    x = torch.tensor([0.25, 0.75, 1.25, 2.5, 3.5, 5.0, 7.0, 100.0, -2.5])
    assert fmt.round_trip(x).tolist() == [0.0, 1.0, 1.0, 2.0, 4.0, 4.0, 6.0, 6.0, -2.0]


@pytest.mark.parametrize("name,bits,sym", [("fp8_e4m3", 4, True), ("fp4", 8, True), ("fp4", 4, False), ("nf4", 3, True)])
def test_impossible_combinations_are_refused(name, bits, sym):
    with pytest.raises(ValueError, match=name):
        make_format(name, bits, sym)

import pytest
import torch

from lowbit.formats import make_format


@pytest.mark.parametrize("bits", range(2, 9))
def test_signed_and_unsigned_ranges(bits):
    signed, unsigned = make_format("int", bits, True), make_format("int", bits, False)
    all_codes = torch.arange(2**bits, dtype=torch.uint8)
    assert signed.decode(all_codes).tolist() == list(range(-(2 ** (bits - 1)), 2 ** (bits - 1)))
    assert unsigned.decode(all_codes).tolist() == list(range(2**bits))
    assert signed.max_value == 2 ** (bits - 1) - 1 and unsigned.max_value == 2**bits - 1
    x = torch.tensor([-1e9, -0.5, 0.5, 1.5, 2.5, 1e9])
    # round half to even, then clamp to the grid
    expected = torch.tensor([-(2 ** (bits - 1)), -0.0, 0.0, 2.0, 2.0, 2 ** (bits - 1) - 1]).clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    assert torch.equal(signed.round_trip(x), expected)


@pytest.mark.parametrize("bits", [1, 9])
def test_bits_out_of_range(bits):
    with pytest.raises(ValueError, match="2 to 8 bits"):
        make_format("int", bits)


def test_unknown_format_lists_valid_names():
    with pytest.raises(ValueError, match="valid formats: int, nf4, fp4, fp8_e4m3, fp8_e5m2"):
        make_format("int5", 5)

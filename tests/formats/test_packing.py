import pytest
import torch

from lowbit.formats import pack, packed_length, unpack


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 5, 8, 13, 64, 576])
def test_round_trip_every_width(bits, n):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 2**bits, (3, n), generator=g).to(torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, packed_length(n, bits))
    assert torch.equal(unpack(packed, bits, n), codes)


def test_no_width_wastes_space():
    # bits/8 bytes per code once n fills whole units: 3-bit is 8 codes in 3 bytes, not a byte each
    for bits in range(1, 9):
        assert packed_length(64, bits) == 64 * bits // 8
    assert packed_length(8, 3) == 3 and packed_length(4, 6) == 3


def test_layout_is_little_endian_low_code_first():
    # 4-bit: code 0 in the low nibble (GPTQ / llama.cpp order)
    assert pack(torch.tensor([[1, 2]], dtype=torch.uint8), 4).tolist() == [[0x21]]
    # 3-bit: codes 0..7 -> bits 0b111_110_101_100_011_010_001_000 little-endian in 3 bytes
    word = sum(i << (3 * i) for i in range(8))
    expected = [(word >> (8 * j)) & 0xFF for j in range(3)]
    assert pack(torch.arange(8, dtype=torch.uint8)[None], 3).tolist() == [expected]


def test_wrong_length_is_reported_as_corrupt():
    with pytest.raises(ValueError, match="corrupt"):
        unpack(torch.zeros(2, 5, dtype=torch.uint8), 3, 16)


@pytest.mark.parametrize("name,bits", [("int", 2), ("int", 3), ("int", 4), ("int", 6), ("int", 8), ("nf4", 4),
                                       ("fp4", 4), ("fp8_e4m3", 8), ("fp8_e5m2", 8)])
def test_decode_packed_equals_unpack_then_decode(name, bits):
    from lowbit.formats import make_format

    fmt = make_format(name, bits)
    codes = torch.randint(0, 2**bits, (5, 77), generator=torch.Generator().manual_seed(bits)).to(torch.uint8)
    torch.testing.assert_close(fmt.decode_packed(pack(codes, bits), 77), fmt.decode(codes), rtol=0, atol=0,
                               equal_nan=True)

"""NF4 against its definition (QLoRA appendix E) and nearest-value encoding."""

import torch

from lowbit.formats import make_format
from lowbit.formats.nf4 import NF4_VALUES


def nf4_from_definition() -> torch.Tensor:
    """Re-derive the table: 8 positive and 7 negative normal quantiles plus zero, scaled to [-1, 1].

    bitsandbytes ``create_normal_map(offset=0.9677083, use_extra_value=True)``: positive quantiles
    at ``linspace(offset, 0.5, 9)[:-1]``, negative at ``linspace(offset, 0.5, 8)[:-1]``.
    """
    offset = 0.9677083
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return values / values.abs().max()


def test_table_matches_definition():
    table = torch.tensor(NF4_VALUES, dtype=torch.float64)
    assert len(NF4_VALUES) == 16 and NF4_VALUES[7] == 0.0 and NF4_VALUES[0] == -1.0 and NF4_VALUES[15] == 1.0
    torch.testing.assert_close(table, nf4_from_definition(), rtol=0, atol=1e-6)


def test_encode_picks_nearest_value():
    fmt = make_format("nf4", 4)
    x = torch.linspace(-1.2, 1.2, 10001)
    table = torch.tensor(NF4_VALUES)
    nearest = (x[:, None] - table[None, :]).abs().argmin(dim=1)
    got = fmt.encode(x).long()
    # Where two table entries are equally near, either is acceptable.
    d_got = (fmt.decode(got.to(torch.uint8)) - x).abs()
    d_best = (table[nearest] - x).abs()
    assert torch.all(d_got <= d_best + 1e-7)


def test_decode_of_every_code_is_the_table():
    fmt = make_format("nf4", 4)
    assert torch.equal(fmt.decode(torch.arange(16, dtype=torch.uint8)), torch.tensor(NF4_VALUES))
    assert torch.equal(fmt.encode(torch.tensor(NF4_VALUES)), torch.arange(16, dtype=torch.uint8))

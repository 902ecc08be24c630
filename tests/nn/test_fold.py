"""Folding a per-channel scale into the op before a linear leaves the float computation unchanged."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lowbit.nn import fold_input_scale


def _scale(n, seed=0):
    return torch.rand(n, generator=torch.Generator().manual_seed(seed)) * 4 + 0.25


class RMSNorm(nn.Module):
    def __init__(self, n, offset=0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n) * 0.1)
        self.offset = offset

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (self.offset + self.weight)


@pytest.mark.parametrize("make_prev, offset", [
    (lambda: nn.Linear(32, 64), 0.0),
    (lambda: Conv1D(64, 32), 0.0),
    (lambda: nn.LayerNorm(64), 0.0),
    (lambda: RMSNorm(64), 0.0),
    (lambda: RMSNorm(64, offset=1.0), 1.0),  # Gemma: x * (1 + w)
])
def test_fold_keeps_outputs(make_prev, offset):
    torch.manual_seed(0)
    prev = make_prev()
    if isinstance(prev, RMSNorm):
        prev.offset = offset
    consumers = [nn.Linear(64, 16), Conv1D(8, 64)]
    x = torch.randn(5, 32 if isinstance(prev, (nn.Linear, Conv1D)) else 64)
    with torch.no_grad():
        before = [c(torch.relu(prev(x))) for c in consumers]  # ReLU commutes with a positive scale
        fold_input_scale(prev, consumers, _scale(64), norm_weight_offset=offset)
        after = [c(torch.relu(prev(x))) for c in consumers]
    for b, a in zip(before, after):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_bad_scales_and_shapes_are_refused():
    prev, consumer = nn.Linear(8, 16), nn.Linear(16, 4)
    weights = (prev.weight.clone(), consumer.weight.clone())
    with pytest.raises(ValueError, match="finite positive"):
        fold_input_scale(prev, [consumer], torch.zeros(16))
    with pytest.raises(ValueError, match="reads 16 channels, scale has 8"):
        fold_input_scale(prev, [consumer], torch.ones(8))
    with pytest.raises(ValueError, match="cannot fold a scale into GELU"):
        fold_input_scale(nn.GELU(), [consumer], torch.ones(16))
    assert torch.equal(prev.weight, weights[0]) and torch.equal(consumer.weight, weights[1]), "refused = untouched"

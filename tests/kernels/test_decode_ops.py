"""The fused decode ops (csrc/decode_ops.cpp) against the torch operations they replace."""

import pytest
import torch
import torch.nn.functional as F

from lowbit.kernels import status

pytestmark = pytest.mark.skipif(status() is not None, reason=f"lowbit kernels unavailable: {status()}")


def test_add_rms_norm_adds_in_place_and_normalises():
    g = torch.Generator().manual_seed(0)
    hidden, delta, weight = torch.randn(3, 256, generator=g), torch.randn(3, 256, generator=g), torch.randn(256, generator=g)
    expected_hidden = hidden + delta
    expected = weight * (expected_hidden * torch.rsqrt(expected_hidden.pow(2).mean(-1, keepdim=True) + 1e-5))
    out = torch.ops.lowbit_kernels.add_rms_norm(hidden, delta, weight, 1e-5)
    torch.testing.assert_close(hidden, expected_hidden, rtol=0, atol=0)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_rotary_is_transformers_rotation_bit_for_bit():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 64, generator=g)
    angles = torch.randn(2, 32, generator=g)
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    as_hf = x.transpose(0, 1).unsqueeze(0)  # [1, heads, n, d]
    expected, _ = apply_rotary_pos_emb(as_hf, as_hf, cos.unsqueeze(0), sin.unsqueeze(0))
    torch.ops.lowbit_kernels.rotary_(x, cos, sin)
    assert torch.equal(x, expected[0].transpose(0, 1))


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (9, 3), (8, 2), (12, 2), (16, 2), (10, 2)])
@pytest.mark.parametrize("length", [1, 7, 8, 33])
def test_decode_attention_equals_sdpa(heads, kv_heads, length):
    g = torch.Generator().manual_seed(heads * 100 + length)
    d, capacity = 64, 40
    q = torch.randn(heads, d, generator=g)
    keys, values = torch.randn(kv_heads, capacity, d, generator=g), torch.randn(kv_heads, capacity, d, generator=g)
    expected = F.scaled_dot_product_attention(q.view(1, heads, 1, d), keys[:, :length].unsqueeze(0),
                                              values[:, :length].unsqueeze(0), scale=0.125, enable_gqa=True)
    got = torch.ops.lowbit_kernels.decode_attention(q, keys.transpose(1, 2).contiguous(), values, length, 0.125)
    torch.testing.assert_close(got, expected.view(heads, d), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("start, length", [(1, 9), (5, 13), (8, 40), (31, 33)])
def test_decode_attention_over_a_window_equals_sdpa_over_its_positions(start, length):
    g = torch.Generator().manual_seed(start * 100 + length)
    heads, kv_heads, d, capacity = 4, 2, 64, 40
    q = torch.randn(heads, d, generator=g)
    keys, values = torch.randn(kv_heads, capacity, d, generator=g), torch.randn(kv_heads, capacity, d, generator=g)
    expected = F.scaled_dot_product_attention(q.view(1, heads, 1, d), keys[:, start:length].unsqueeze(0),
                                              values[:, start:length].unsqueeze(0), scale=0.125, enable_gqa=True)
    got = torch.ops.lowbit_kernels.decode_attention(q, keys.transpose(1, 2).contiguous(), values, length, 0.125, start)
    torch.testing.assert_close(got, expected.view(heads, d), rtol=1e-5, atol=1e-5)

import torch

from lowbit.formats import DoubleQuantScales


def test_scales_survive_within_half_an_int8_step():
    g = torch.Generator().manual_seed(0)
    scales = torch.rand(1536, 9, generator=g) * 0.05 + 0.001
    dq = DoubleQuantScales.from_scales(scales)
    back = dq.dequantize()
    assert back.shape == scales.shape
    centred = scales.flatten() - scales.mean()
    step = torch.nn.functional.pad(centred, (0, -centred.numel() % 256)).reshape(-1, 256).abs().amax(1) / 127
    err = (back.flatten() - scales.flatten()).abs()
    bound = step.repeat_interleave(256)[: err.numel()] / 2 + 1e-7
    assert torch.all(err <= bound)


def test_qlora_cost_is_8_127_bits_per_scale_block_of_256():
    dq = DoubleQuantScales.from_scales(torch.rand(256 * 40) + 0.1)
    # 8 bits per scale + one float32 per 256 scales + one float32 offset
    assert dq.storage_bits() == 256 * 40 * 8 + 40 * 32 + 32


def test_constant_scales_are_exact():
    scales = torch.full((300,), 0.0123)
    torch.testing.assert_close(DoubleQuantScales.from_scales(scales).dequantize(), scales, rtol=0, atol=1e-9)

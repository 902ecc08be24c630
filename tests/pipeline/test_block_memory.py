"""What one block of a streamed job needs, and the one-line refusal of a limit below it."""

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from lowbit.pipeline.block_memory import block_bytes, check_block_fits


def _block() -> torch.nn.Module:
    config = Qwen2Config(hidden_size=256, intermediate_size=768, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512)
    with torch.device("meta"):
        return Qwen2ForCausalLM(config).model.layers[0]


def test_the_widest_input_sets_the_solve():
    parts = block_bytes(_block(), seqlen=16, hidden=256, batch_size=1, hessian=True)
    # down_proj: 768 inputs, 256 outputs: two [768, 768] buffers and four copies of its weight
    assert parts["forward or solve"] == (2 * 768 * 768 + 4 * 768 * 256) * 4
    assert parts["statistics"] == (768 * 768 + 3 * 256 * 256) * 4
    without = block_bytes(_block(), seqlen=16, hidden=256, batch_size=1, hessian=False)
    assert without["forward or solve"] == 4 * 16 * 768 * 4  # no solve buffers without a Hessian


def test_a_limit_below_one_block_is_refused_in_one_line():
    parts = block_bytes(_block(), seqlen=512, hidden=256, batch_size=4, hessian=True)
    need = sum(parts.values())
    check_block_fits(parts, None)
    check_block_fits(parts, need)
    with pytest.raises(ValueError, match=r"^the memory limit of \d+ MiB is below what one block needs: \d+ MiB") as e:
        check_block_fits(parts, need - (1 << 20))
    assert "\n" not in str(e.value)

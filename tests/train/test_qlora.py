"""QLoRA on a tiny Llama: a few steps lower the loss, the base stays frozen and packed, and the adapter
is peft's own (it loads with ``PeftModel.from_pretrained`` on the float base)."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

import lowbit
from lowbit.nn import QuantLinear
from lowbit.train import qlora

TEXT = "the cat sat on the mat and the dog sat on the log. " * 300


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text(TEXT)
    return path


def _settings(text_file, **kw) -> qlora.TrainSettings:
    return qlora.TrainSettings(data=str(text_file), **{"steps": 12, "seqlen": 64, "batch_size": 2, "lr": 3e-3,
                                                        "warmup": 1, "log_every": 100, **kw})


def _nf4(tiny_llama_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=lowbit.LowbitConfig(load_in_4bit=True))


def _lora_state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}


def test_qlora_trains_adapters_on_a_frozen_nf4_base(tiny_llama_dir, text_file, tmp_path):
    tokenizer = lowbit.load(str(tiny_llama_dir))[1]
    model = qlora.add_lora(_nf4(tiny_llama_dir), qlora.LoraSettings(r=8, alpha=16, dropout=0.0))
    codes_before = {n: m.qdata.clone() for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(codes_before) == 14
    report = qlora.train(model, tokenizer, _settings(text_file), progress=False)
    assert sum(report.losses[-3:]) / 3 < report.losses[0] - 0.5
    assert all(torch.equal(m.qdata, codes_before[n]) for n, m in model.named_modules() if isinstance(m, QuantLinear))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert report.optimizer_state_bytes == 2 * 4 * report.trainable_params + 4 * len(trainable)  # exp_avg(_sq), step

    qlora.save_adapter(model, tmp_path / "adapter", base="tiny")
    float_base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    on_float = PeftModel.from_pretrained(float_base, tmp_path / "adapter")
    trained = _lora_state(model)
    loaded = _lora_state(on_float)
    assert trained.keys() == loaded.keys() and all(torch.equal(trained[k], loaded[k]) for k in trained)


def test_training_is_deterministic(tiny_llama_dir, text_file):
    tokenizer = lowbit.load(str(tiny_llama_dir))[1]
    states = []
    for _ in range(2):
        torch.manual_seed(123)  # LoRA A's initialisation
        model = qlora.add_lora(_nf4(tiny_llama_dir), qlora.LoraSettings(r=4))
        qlora.train(model, tokenizer, _settings(text_file, steps=3), progress=False)
        states.append(_lora_state(model))
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_merge_requantizes_and_keeps_the_adapted_behaviour(tiny_llama_dir, text_file, tmp_path):
    tokenizer = lowbit.load(str(tiny_llama_dir))[1]
    model = qlora.add_lora(_nf4(tiny_llama_dir), qlora.LoraSettings(r=8, dropout=0.0))
    qlora.train(model, tokenizer, _settings(text_file), progress=False)
    ids = torch.randint(3, 500, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapted = model(ids).logits
    out = qlora.merge_and_save(model, tmp_path / "merged", tokenizer)
    merged, _ = lowbit.load(out)
    assert isinstance(merged.model.layers[0].mlp.up_proj, QuantLinear)
    with torch.no_grad():
        p, q = adapted.log_softmax(-1), merged(ids).logits.log_softmax(-1)
    assert float((p.exp() * (p - q)).sum(-1).mean()) < 0.05  # only the re-quantization error


def test_bad_input_is_refused(tiny_llama_dir, text_file, tmp_path):
    tokenizer = lowbit.load(str(tiny_llama_dir))[1]
    with pytest.raises(ValueError, match="--target qkv matches no linear layer"):
        qlora.add_lora(_nf4(tiny_llama_dir), qlora.LoraSettings(targets=("qkv",)))
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("too short")
    model = qlora.add_lora(_nf4(tiny_llama_dir), qlora.LoraSettings(r=4))
    with pytest.raises(ValueError, match="fewer than one window"):
        qlora.train(model, tokenizer, _settings(tiny), progress=False)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(ValueError, match="is empty"):
        qlora.train(model, tokenizer, _settings(empty), progress=False)
    qlora.save_adapter(model, tmp_path / "adapter", base="tiny")
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(hidden_size=512, intermediate_size=512, num_hidden_layers=2,
                                         num_attention_heads=4, vocab_size=512))
    with pytest.raises(ValueError, match="trained on another base model .*hidden_size 256 there, 512 here"):
        qlora.load_adapter(other, tmp_path / "adapter")


def test_merge_into_a_rotated_base_keeps_the_adapted_behaviour():
    """A rotated ``down_proj`` reads Hadamard-rotated inputs while its adapter reads plain ones: the
    merge must rotate the adapter's update and keep the layer's online rotation."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lowbit.nn.input_hadamard import has_input_hadamard

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=512)).eval()
    lowbit.quantize(model, lowbit.Recipe(default=lowbit.QuantScheme(bits=8, granularity="channel"),
                                         transforms=("hadamard",)), progress=False)
    model = qlora.add_lora(model, qlora.LoraSettings(r=8, dropout=0.0, targets=("down_proj",)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
        ids = torch.randint(0, 512, (1, 32), generator=torch.Generator().manual_seed(1))
        adapted = model(ids).logits
        merged = model.merge_and_unload()
        down = merged.model.layers[0].mlp.down_proj
        assert isinstance(down, QuantLinear) and has_input_hadamard(down)
        err = (merged(ids).logits - adapted).norm() / adapted.norm()
    assert err < 0.01  # only the 8-bit re-quantization error

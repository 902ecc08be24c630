"""The TFLite exporter: Google's converter writes a tiny Llama with int8 weights that the LiteRT
interpreter runs, scoring within 1% of torch's perplexity on the same windows."""

from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit.cli import main

pytest.importorskip("litert_torch")
pytest.importorskip("ai_edge_litert")

from lowbit.evaluate.perplexity import evaluate_models  # noqa: E402
from lowbit.tflite import TfliteCausalLM  # noqa: E402

SEQ_LEN = 64


def test_a_tiny_llama_with_int8_weights_runs_on_litert_within_one_percent_of_torch(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "m.tflite"
    assert main(["export", str(tiny_llama_dir), "--to", "tflite", "-o", str(out), "--seq-len", str(SEQ_LEN),
                 "--quiet"]) == 0
    assert "int8 weights" in capsys.readouterr().out
    lm = TfliteCausalLM(out)
    dtypes = lm.weight_dtypes()
    assert lm.seq_len == SEQ_LEN and dtypes["int8"] >= 1_000_000  # the 14 linears and the embedding, int8
    model, _ = lowbit.load(str(tiny_llama_dir))
    windows = torch.randint(0, model.config.vocab_size, (4, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    reference, tflite = evaluate_models([model, lm], windows, bos_id=None, reference=model, progress=False)
    assert abs(tflite.ppl / reference.ppl - 1) < 0.01
    assert tflite.kld > 0  # re-quantized to int8: not the float model's logits
    with pytest.raises(ValueError, match="takes ids of shape"):
        lm(windows[:1, :8])

"""Run a lowbit ONNX export with ``onnxruntime`` on CPU: full-sequence logits (for scoring) and
greedy decoding through the KV cache.

    lm = OnnxCausalLM("out/smollm2-int4-onnx", threads=1)
    logits = lm(input_ids)                       # torch [batch, seq, vocab]: evaluate_windows takes it
    tokens = lm.generate(prompt_ids, 32)         # one prefill, then one token per call

The cache tensors' names and shapes are read from the session's inputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from lowbit.io.export.onnx import MODEL_FILE
from lowbit.io.output import ONNX_RECORD


class OnnxCausalLM:
    """An ONNX Runtime session over ``path``: a directory ``lowbit export --to onnx`` wrote, or any
    ``model.onnx`` with the same cache convention (``input_ids``, ``past_key_values.i.key/value`` ->
    ``logits``, ``present.i.key/value``), such as onnxruntime-genai's model builder writes; an
    ``attention_mask`` input, where the graph has one, is all ones (no padding)."""

    def __init__(self, path: str | Path, threads: int = 1) -> None:
        import onnxruntime as ort

        path = Path(path)
        if not (path / MODEL_FILE).is_file():
            raise ValueError(f"{path} has no {MODEL_FILE}; write one with lowbit export --to onnx")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        record = path / ONNX_RECORD
        if record.is_file():
            # onnxruntime fuses an 8-bit DequantizeLinear + MatMul into MatMulNBits at this level (its own
            # default is 4, int8 activations); the export's level applies to those layers too
            level = json.loads(record.read_text())["accuracy_level"]
            options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(level))
        self.session = ort.InferenceSession(str(path / MODEL_FILE), options, providers=["CPUExecutionProvider"])
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.past_names = [name for name in inputs if name.startswith("past_key_values.")]
        self.has_mask = "attention_mask" in inputs
        _, self.kv_heads, _, self.head_dim = inputs[self.past_names[0]].shape
        genai = path / "genai_config.json"
        if genai.is_file():  # onnxruntime-genai's graphs leave these dimensions symbolic
            decoder = json.loads(genai.read_text())["model"]["decoder"]
            self.kv_heads, self.head_dim = decoder["num_key_value_heads"], decoder["head_size"]

    def empty_cache(self, batch: int) -> dict[str, np.ndarray]:
        """The past of a first call: every cache tensor ``[batch, kv_heads, 0, head_dim]``."""
        empty = np.zeros((batch, self.kv_heads, 0, self.head_dim), dtype=np.float32)
        return {name: empty for name in self.past_names}

    def step(self, input_ids: np.ndarray, past: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Logits ``[batch, seq, vocab]`` of ``input_ids`` (int64 ``[batch, seq]``) after ``past``, and
        the cache including them (the next call's ``past``)."""
        feed = {"input_ids": np.ascontiguousarray(input_ids, dtype=np.int64), **past}
        if self.has_mask:
            total = input_ids.shape[1] + next(iter(past.values())).shape[2]
            feed["attention_mask"] = np.ones((input_ids.shape[0], total), dtype=np.int64)
        out = self.session.run(None, feed)
        return out[0], dict(zip(self.past_names, out[1:]))

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits of every position of ``input_ids`` with an empty cache, as torch float32."""
        ids = input_ids.cpu().numpy()
        logits, _ = self.step(ids, self.empty_cache(ids.shape[0]))
        return torch.from_numpy(logits)

    def generate(self, prompt: list[int], new_tokens: int) -> list[int]:
        """Greedy continuation of ``prompt`` (``new_tokens`` ids): one prefill, then one token per call."""
        logits, past = self.step(np.array([prompt]), self.empty_cache(1))
        tokens = [int(logits[0, -1].argmax())]
        for _ in range(new_tokens - 1):
            logits, past = self.step(np.array([[tokens[-1]]]), past)
            tokens.append(int(logits[0, -1].argmax()))
        return tokens

"""TFLite / LiteRT through Google's converter: a causal LM as a ``.tflite`` file with int8 weights, and
a runner for it on the LiteRT interpreter.

    write_tflite(model, Path("m.tflite"), seq_len=512)   # float or lowbit-quantized (seen as float)
    lm = TfliteCausalLM("m.tflite")                      # lm(ids [1, 512]) -> logits, like a torch model

The conversion is ``litert_torch.convert`` (formerly ai-edge-torch) of the model's full-sequence forward
at a fixed ``[1, seq_len]`` input, with its ``full_weight_only_recipe``: every weight matrix int8 per
output channel (symmetric), computed by Google's quantizer from the float weights. So lowbit's own
codes are not carried over: a lowbit-quantized model is written through its float view
(``lowbit.nn.float_view``: the dequantized weights) and re-quantized to int8, and its grid (int8
symmetric uses -128..127 with ``absmax / 127.5`` steps) is not TFLite's (``absmax / 127``, -127..127).
The graph has no KV cache and a static length: a scorer, not a decoder. Needs ``litert-torch`` (the
``tflite`` extra).
"""

from __future__ import annotations

from pathlib import Path
import numpy as np
import torch
from torch import nn

from lowbit.io.output import staged_output


class _Logits(nn.Module):
    """``ids [1, seq_len] -> logits`` of a transformers causal LM, without a cache (what gets converted)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, use_cache=False).logits


@torch.no_grad()
def write_tflite(model: nn.Module, path: Path, seq_len: int) -> int:
    """Convert ``model`` (only read) with int8 weights and write it to ``path`` through a staged file;
    returns the bytes written.

    Raises:
        ValueError: ``seq_len`` below 1 or above the model's ``max_position_embeddings``.
        ImportError: litert-torch is not installed (``pip install lowbit[tflite]``).
    """
    import litert_torch
    from litert_torch.generative.quantize import quant_recipes

    from lowbit.nn.float_view import float_view

    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if seq_len < 1 or (limit is not None and seq_len > limit):
        raise ValueError(f"seq_len must be 1 to {limit}, got {seq_len}")
    was_training = model.training
    model.eval()
    try:
        with float_view(model):
            sample = torch.zeros((1, seq_len), dtype=torch.long)
            edge = litert_torch.convert(_Logits(model).eval(), (sample,),
                                        quant_config=quant_recipes.full_weight_only_recipe())
            with staged_output(path, overwrite=True, directory=False) as tmp:
                edge.export(str(tmp))
    finally:
        model.train(was_training)
    return Path(path).stat().st_size


class TfliteCausalLM:
    """The LiteRT interpreter over a file ``write_tflite`` wrote: ``lm(ids)`` -> torch logits
    ``[1, seq_len, vocab]`` for ``ids [1, seq_len]`` (the file's static length)."""

    def __init__(self, path: str | Path, threads: int = 1) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(model_path=str(path), num_threads=threads)
        self.interpreter.allocate_tensors()
        self._input = self.interpreter.get_input_details()[0]
        self._output = self.interpreter.get_output_details()[0]
        self.seq_len = int(self._input["shape"][1])

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        if tuple(ids.shape) != (1, self.seq_len):
            raise ValueError(f"this TFLite model takes ids of shape (1, {self.seq_len}), got {tuple(ids.shape)}")
        self.interpreter.set_tensor(self._input["index"], ids.numpy().astype(self._input["dtype"]))
        self.interpreter.invoke()
        return torch.from_numpy(np.array(self.interpreter.get_tensor(self._output["index"])))

    def weight_dtypes(self) -> dict[str, int]:
        """Elements stored per dtype name over the file's tensors (the int8 weights show here)."""
        counts: dict[str, int] = {}
        for tensor in self.interpreter.get_tensor_details():
            name = np.dtype(tensor["dtype"]).name
            counts[name] = counts.get(name, 0) + int(np.prod(tensor["shape"]))
        return counts


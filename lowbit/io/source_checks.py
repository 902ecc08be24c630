"""What a source model must be before lowbit quantizes or measures it: a decoder-only causal LM
with finite weights.

Both are checked where models come in (``lowbit.sources.load_model``), because what goes wrong
otherwise is silent: an encoder (BERT's masked LM) or an encoder-decoder loads through
``AutoModelForCausalLM`` as an encoder run as a decoder, quantizes, and yields a checkpoint that
cannot be loaded back; a NaN in a tensor kept in float (a norm, the embedding) passes every
quantized layer's own check and turns every result into NaN.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def check_causal_lm(config: dict[str, Any], where: str) -> None:
    """Refuse a model whose ``config`` (its ``config.json`` as a dict) is not a decoder-only causal LM.

    Encoders are the model types transformers also maps to a masked LM (BERT, RoBERTa, ...: their
    causal class is the encoder run as a decoder); encoder-decoders say ``is_encoder_decoder``.

    Raises:
        ValueError: one line naming ``where``, the model type and what lowbit quantizes instead.
    """
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    model_type = config.get("model_type")
    architectures = config.get("architectures")
    named = f"{model_type} ({', '.join(map(str, architectures))})" if isinstance(architectures, list) else model_type
    if not isinstance(model_type, str) or not model_type:
        raise ValueError(f"{where}: config.json has no model_type, so it does not say what model it is")
    if config.get("is_encoder_decoder") is True or model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        kind = "an encoder-decoder" if config.get("is_encoder_decoder") is True else "an encoder"
    elif model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        kind = "not a causal language model transformers knows"
    else:
        return
    raise ValueError(f"{where}: {named} is {kind}; lowbit quantizes decoder-only causal language models "
                     "(Llama, Mistral, Qwen2, Gemma, GPT-2, ...) and could not load such a checkpoint back")


def check_finite(model: nn.Module, where: str) -> None:
    """Refuse ``model`` when any of its parameters or buffers holds a NaN or an infinity.

    Raises:
        ValueError: one line naming ``where``, the first such tensor and how many values are bad.
    """
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise ValueError(f"{where}: tensor {name} has {bad} NaN/Inf values of {tensor.numel()}; lowbit refuses "
                             "a model with non-finite weights (every result from it would be NaN)")

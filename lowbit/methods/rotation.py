"""Hadamard rotation of a float model before quantization (QuaRot, Ashkboos et al. 2024).

Activation outliers concentrate in a few channels; an orthogonal rotation of a layer's input,
undone in its weight, spreads them over all channels so an 8-bit grid covers every token well.
Three rotations, all exact in float (logits unchanged up to rounding):

1. The residual stream, offline. Each RMSNorm's weight is folded into the linears that read it
   (and set to 1), so the norm only divides by the RMS, which a rotation preserves. Then the
   embedding and every linear writing the residual (``o_proj``, ``down_proj``) are multiplied by
   ``Q``, a randomized Hadamard matrix, and every linear reading it (q/k/v, gate/up, the LM head) by
   ``Q^T``. A tied LM head is untied first (it now differs from the embedding by the final norm's
   weight): the checkpoint stores one more float ``[vocab, hidden]`` matrix.
2. Each attention head's values, offline: ``v_proj``'s outputs and ``o_proj``'s matching inputs by
   the head-size Hadamard matrix (attention mixes tokens, not channels, so it commutes).
3. ``down_proj``'s input, online: its weight is multiplied by the Hadamard matrix of its input
   size and the layer rotates its input on every forward (``lowbit.nn.input_hadamard``, a few
   small dense products, ``lowbit.hadamard``). The product of the gate and up projections has no
   linear op to fold into.

Only decoders whose blocks are pre-norm with RMSNorm and nothing between a norm and its readers
(Llama, Mistral, Qwen2) can be rotated so; Gemma's post-norms rescale the rotated output channel by
channel and are refused. SmoothQuant and AWQ scale channels of the unrotated basis and do not
compose with the online rotation; GPTQ and RTN do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lowbit.hadamard import hadamard_matrix, random_hadamard_matrix
from lowbit.methods.transforms import TransformKind, register_transform
from lowbit.nn import quantized_layers
from lowbit.nn.input_hadamard import add_input_hadamard

ROTATABLE_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class HadamardConfig:
    """``seed`` of the random signs of the residual stream's Hadamard matrix."""

    seed: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.seed, int) and self.seed >= 0):
            raise ValueError(f"hadamard seed must be an int >= 0, got {self.seed!r}")


def check_rotatable(model: nn.Module) -> None:
    """Raise ``ValueError`` naming the problem when ``rotate_model`` cannot rotate ``model``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ROTATABLE_MODEL_TYPES:
        raise ValueError(f"--rotate supports pre-norm RMSNorm decoders ({', '.join(ROTATABLE_MODEL_TYPES)}), "
                         f"not {model_type!r}; quantize this model without --rotate")
    if quantized_layers(model):
        raise ValueError("--rotate needs the float model; rotate before quantizing, not after")
    for layer in model.model.layers:
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            if "RMSNorm" not in type(norm).__name__ or getattr(norm, "bias", None) is not None:
                raise ValueError(f"--rotate needs RMSNorm without bias, found {type(norm).__name__}")


@torch.no_grad()
def rotate_model(model: nn.Module, seed: int = 0) -> None:
    """Rotate ``model`` in place as the module docstring says; its float outputs do not change.

    Raises:
        ValueError: the architecture cannot be rotated (``check_rotatable``).
    """
    check_rotatable(model)
    decoder, config = model.model, model.config
    q = random_hadamard_matrix(config.hidden_size, seed)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    head = hadamard_matrix(head_dim)
    # the same in every block: per-head rotations of the values (v_proj's outputs, o_proj's inputs)
    # and the online rotation of down_proj's input
    values = torch.block_diag(*[head] * config.num_key_value_heads)
    attention_out = torch.block_diag(*[head] * config.num_attention_heads)
    mlp_in = hadamard_matrix(config.intermediate_size)

    if model.lm_head.weight is decoder.embed_tokens.weight:
        model.lm_head.weight = nn.Parameter(decoder.embed_tokens.weight.detach().clone(), requires_grad=False)
    config.tie_word_embeddings = False
    if getattr(config, "get_text_config", None) is not None:
        config.get_text_config().tie_word_embeddings = False

    _set(decoder.embed_tokens, "weight", _weight(decoder.embed_tokens) @ q)
    for layer in decoder.layers:
        attn, mlp = layer.self_attn, layer.mlp
        _fold_norm(layer.input_layernorm, (attn.q_proj, attn.k_proj, attn.v_proj))
        _fold_norm(layer.post_attention_layernorm, (mlp.gate_proj, mlp.up_proj))
        for reader in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
            _set(reader, "weight", _weight(reader) @ q)
        for writer in (attn.o_proj, mlp.down_proj):
            _set(writer, "weight", q.T @ _weight(writer))
            if writer.bias is not None:
                _set(writer, "bias", writer.bias.double() @ q)
        _set(attn.v_proj, "weight", values.T @ _weight(attn.v_proj))
        if attn.v_proj.bias is not None:
            _set(attn.v_proj, "bias", attn.v_proj.bias.double() @ values)
        _set(attn.o_proj, "weight", _weight(attn.o_proj) @ attention_out)
        _set(mlp.down_proj, "weight", _weight(mlp.down_proj) @ mlp_in)
        add_input_hadamard(mlp.down_proj)
    _fold_norm(decoder.norm, (model.lm_head,))
    _set(model.lm_head, "weight", _weight(model.lm_head) @ q)


def _weight(module: nn.Module) -> Tensor:
    return module.weight.double()


def _set(module: nn.Module, name: str, value: Tensor) -> None:
    tensor = getattr(module, name)
    tensor.data = value.to(tensor.dtype).contiguous()


def _fold_norm(norm: nn.Module, readers: tuple[nn.Module, ...]) -> None:
    """Multiply the readers' input columns by the norm's weight and set that weight to 1."""
    for reader in readers:
        _set(reader, "weight", _weight(reader) * norm.weight.double())
    norm.weight.data.fill_(1.0)


@register_transform("hadamard", config=HadamardConfig, kind=TransformKind.ROTATION,
                    excludes={TransformKind.CHANNEL_SCALING: "SmoothQuant and AWQ scale channels of the unrotated "
                                                             "basis"},
                    summary="QuaRot Hadamard rotation (residual stream, per-head values, online on down_proj inputs)")
def _rotate(model: nn.Module, config: HadamardConfig) -> None:
    rotate_model(model, seed=config.seed)

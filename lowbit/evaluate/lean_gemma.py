"""The lean decode loop for Gemma 3 text models: the same weights, less machinery (see ``lean_decode``).

Gemma 3 differs from Llama in ways the compiled ``decode_layer`` does not cover, so this loop runs
the layers from Python over the same fused ops and kernel calls: RMSNorms scale by ``1 + w`` (the
weights are shifted once here), every block norms the attention and MLP outputs before adding them
(post-attention and post-feedforward norms) and norms q and k per head; local layers attend to a
sliding window and rotate with their own RoPE base; the MLP is GELU (tanh) gated; the embedding is
scaled by sqrt(hidden) (the model's own embedding module does it). It computes what transformers
computes up to float32 rounding: greedy tokens match transformers' loop (tests/evaluate/test_lean_gemma.py).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lowbit.evaluate.lean_decode import KVCache, _Product, _stacks_in_huge_pages

SUPPORTED_TYPES = ("gemma3_text",)
LAYER_TYPES = ("full_attention", "sliding_attention")


def gemma_support(model: nn.Module) -> str | None:
    """None when ``GemmaLeanDecoder`` runs ``model``, else why not (one line)."""
    config = model.config
    if getattr(config, "use_bidirectional_attention", False):
        return "the lean decode loop has no bidirectional attention"
    if getattr(config, "attn_logit_softcapping", None) or getattr(config, "final_logit_softcapping", None):
        return "the lean decode loop does not cap logits"
    if any(t not in LAYER_TYPES for t in config.layer_types):
        return f"the lean decode loop covers layer types {', '.join(LAYER_TYPES)}, not {set(config.layer_types)}"
    inner = model.model
    norm = inner.norm
    if norm.weight.dtype != torch.float32 or norm.weight.device.type != "cpu":
        return "the lean decode loop runs float32 models on the CPU"
    if inner.layers[0].self_attn.head_dim % 8:
        return f"the lean decode loop needs a head size that is a multiple of 8, got {inner.layers[0].self_attn.head_dim}"
    return None


def _shifted(norm: nn.Module) -> tuple[Tensor, float]:
    """A Gemma RMSNorm as ``add_rms_norm`` arguments: weight ``1 + w`` (float32), epsilon."""
    return (1.0 + norm.weight.float()).contiguous(), norm.eps


class GemmaLeanDecoder:
    """Prefill and decode a Gemma 3 text model over a KV cache of ``max_length`` positions, one sequence;
    the contract of ``lean_decode.LeanDecoder``."""

    def __init__(self, model: nn.Module, max_length: int) -> None:
        config = model.config
        self.model = model
        self.ops = torch.ops.lowbit_kernels
        inner = model.model
        layers = inner.layers[: config.num_hidden_layers]
        attention = layers[0].self_attn
        self.heads, self.head_dim, self.scaling = config.num_attention_heads, attention.head_dim, attention.scaling
        self.window = config.sliding_window
        self.layer_types = list(config.layer_types[: len(layers)])
        self.cache = KVCache(len(layers), config.num_key_value_heads, self.head_dim, max_length)
        self.length = 0
        self.steps = [_GemmaLayer(layer) for layer in layers]
        _stacks_in_huge_pages([p for step in self.steps for p in (step.qkv, step.o, step.gate_up, step.down)])
        self.final_norm = _shifted(inner.norm)

    @torch.inference_mode()
    def __call__(self, input_ids: Tensor) -> Tensor:
        start, n = self.length, input_ids.shape[1]
        end = start + n
        self.cache.check_room(end)
        inner, ops = self.model.model, self.ops
        hidden = inner.embed_tokens(input_ids)[0].float().contiguous()  # [n, hidden], updated in place by each norm
        positions = torch.arange(start, end).unsqueeze(0)
        rotations = {kind: tuple(t[0].contiguous() for t in inner.rotary_emb(hidden, positions, kind))
                     for kind in set(self.layer_types)}
        delta = None
        for i, step in enumerate(self.steps):
            kind = self.layer_types[i]
            x = ops.add_rms_norm(hidden, delta, *step.input_norm)
            attention = self._attention(step, x, *rotations[kind], i, start, kind == "sliding_attention")
            x = ops.add_rms_norm(hidden, ops.add_rms_norm(attention, None, *step.post_attention_norm),
                                 *step.pre_feedforward_norm)
            gate, up = step.gate_up(x)
            delta = ops.add_rms_norm(step.down(step.act(gate) * up)[0], None, *step.post_feedforward_norm)
        self.length = end
        last = hidden[-1:].clone()
        return self.model.lm_head(ops.add_rms_norm(last, delta[-1:], *self.final_norm)).float()

    def _attention(self, step: _GemmaLayer, x: Tensor, cos: Tensor, sin: Tensor, index: int, start: int,
                   sliding: bool) -> Tensor:
        n, heads, d = x.shape[0], self.heads, self.head_dim
        q, k, v = step.qkv(x)
        q = self.ops.add_rms_norm(q.reshape(-1, d).contiguous(), None, *step.q_norm).reshape(n, heads, d)
        k = self.ops.add_rms_norm(k.reshape(-1, d).contiguous(), None, *step.k_norm).reshape(n, -1, d)
        qk = torch.cat((q, k), dim=1)  # one rotation for both
        self.ops.rotary_(qk, cos, sin)
        window = self.window if sliding else None
        return step.o(self.cache.attend(index, qk, v.reshape(n, -1, d), heads, start, self.scaling, window))[0]


class _GemmaLayer:
    """One Gemma 3 decoder layer's products (stacked where they can be) and shifted norms."""

    def __init__(self, layer: nn.Module) -> None:
        attention, mlp = layer.self_attn, layer.mlp
        self.input_norm = _shifted(layer.input_layernorm)
        self.post_attention_norm = _shifted(layer.post_attention_layernorm)
        self.pre_feedforward_norm = _shifted(layer.pre_feedforward_layernorm)
        self.post_feedforward_norm = _shifted(layer.post_feedforward_layernorm)
        self.q_norm, self.k_norm = _shifted(attention.q_norm), _shifted(attention.k_norm)
        self.qkv = _Product([attention.q_proj, attention.k_proj, attention.v_proj])
        self.o = _Product([attention.o_proj])
        self.gate_up = _Product([mlp.gate_proj, mlp.up_proj])
        self.down = _Product([mlp.down_proj])
        self.act = mlp.act_fn

"""A Llama-family causal LM as one ONNX graph with a KV cache, built node by node.

Inputs ``input_ids`` int64 ``[batch, seq]`` and, per layer ``i``, ``past_key_values.i.key`` /
``.value`` float32 ``[batch, kv_heads, past, head_dim]`` (``past`` = 0 for the first call); outputs
``logits`` float32 ``[batch, seq, vocab]`` and ``present.i.key`` / ``.value`` ``[batch, kv_heads,
past + seq, head_dim]``, which the next call takes as its past. Positions are ``past .. past+seq-1``
and attention is causal over past and new tokens; rows of a batch are the same length (no padding
mask), which is what scoring windows and decoding one prompt need.

The graph is written here rather than traced from transformers (``torch.onnx.export`` of
``LlamaForCausalLM`` with a cache object is fragile across versions) and computes what
transformers' ``LlamaForCausalLM`` does, in float32: RMSNorm, rotary embeddings from the model's own
``inv_freq`` and ``attention_scaling``, grouped-query attention (queries of the heads sharing a KV head
are stacked, so K and V are never repeated), SiLU-gated MLP. Linears are ``lowbit.onnx.linear``'s.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from lowbit.nn import QuantEmbedding, QuantLinear
from lowbit.onnx.graph import FLOAT, INT64, GraphBuilder, value_info
from lowbit.onnx.linear import add_linear, dequant_tensors, nbits_tensors
from lowbit.onnx.schemes import nbits_block

ARCHITECTURES = ("llama",)  # config.model_type values this graph computes
ROPE_TYPES = ("default", "linear", "llama3", "yarn")  # position-independent inv_freq: one table serves all


def unsupported(model: nn.Module) -> str | None:
    """Why ``model`` is not a Llama-family model this graph computes, else None (one clause)."""
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if kind not in ARCHITECTURES:
        return f"architecture {kind!r} is not mapped (mapped: {', '.join(ARCHITECTURES)})"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act {config.hidden_act!r} is not mapped (silu is)"
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        return f"rope type {rope_type!r} depends on the sequence length; mapped: {', '.join(ROPE_TYPES)}"
    return None


def io_names(layers: int) -> tuple[list[str], list[str]]:
    """(input names, output names) in graph order, cache tensors as onnxruntime-genai names them."""
    past = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    return ["input_ids", *past], ["logits", *present]


class _Dims:
    def __init__(self, config: Any) -> None:
        self.hidden = config.hidden_size
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or self.hidden // self.heads
        self.group = self.heads // self.kv_heads
        self.eps = float(config.rms_norm_eps)
        self.positions = int(config.max_position_embeddings)


@torch.no_grad()
def build_llama(model: nn.Module, accuracy_level: int, metadata: dict[str, str]):
    """The ONNX ``ModelProto`` of ``model`` (a Llama-family ``*ForCausalLM``, float or quantized by
    lowbit; only read). The caller has checked ``unsupported`` and every layer's scheme."""
    config = model.config
    d = _Dims(config)
    g = GraphBuilder()
    decoder = model.model
    S = g.op("Gather", g.op("Shape", "input_ids"), g.const("one", 1), axis=0, name="seq")
    P = g.op("Gather", g.op("Shape", "past_key_values.0.key"), g.const("two", 2), axis=0, name="past")
    T = g.op("Add", P, S, name="total")
    positions = g.op("Range", P, T, g.const("step", 1), name="positions")
    cos, sin = _rope_tables(g, decoder.rotary_emb, d, positions)
    mask = _causal_mask(g, positions, T)
    S1, T1 = g.op("Unsqueeze", S, g.const("axis0", [0])), g.op("Unsqueeze", T, g.const("axis0", [0]))
    shapes = {"scores5": g.op("Concat", g.const("s5", [0, d.kv_heads, d.group]), S1, T1, axis=0),
              "scores4": g.op("Concat", g.const("s4", [0, d.kv_heads, -1]), T1, axis=0)}
    h = _embedding(g, decoder.embed_tokens, model.lm_head)
    for i, layer in enumerate(decoder.layers):
        x = _rms_norm(g, h, layer.input_layernorm, d.eps, f"layers.{i}.input_layernorm")
        h = g.op("Add", h, _attention(g, x, layer.self_attn, i, d, cos, sin, mask, shapes, accuracy_level))
        x = _rms_norm(g, h, layer.post_attention_layernorm, d.eps, f"layers.{i}.post_attention_layernorm")
        h = g.op("Add", h, _mlp(g, x, layer.mlp, f"model.layers.{i}.mlp", accuracy_level))
    h = _rms_norm(g, h, decoder.norm, d.eps, "norm")
    logits = _lm_head(g, h, model, accuracy_level)
    g.rename(logits, "logits")
    for i in range(len(decoder.layers)):
        for kv in ("key", "value"):
            g.rename(f"present_{i}_{kv}", f"present.{i}.{kv}")
    cache = ["batch", d.kv_heads, "past", d.head_dim]
    inputs = [value_info("input_ids", INT64, ["batch", "seq"])]
    outputs = [value_info("logits", FLOAT, ["batch", "seq", config.vocab_size])]
    for i in range(len(decoder.layers)):
        for kv in ("key", "value"):
            inputs.append(value_info(f"past_key_values.{i}.{kv}", FLOAT, cache))
            outputs.append(value_info(f"present.{i}.{kv}", FLOAT, ["batch", d.kv_heads, "total", d.head_dim]))
    return g.model(inputs, outputs, metadata)


def _rope_tables(g: GraphBuilder, rotary: nn.Module, d: _Dims, positions: str) -> tuple[str, str]:
    """cos and sin ``[seq, head_dim/2]`` at ``positions``, from tables computed as transformers does
    (float32 ``position * inv_freq``, times ``attention_scaling``)."""
    inv_freq = rotary.inv_freq.float()
    freqs = torch.arange(d.positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
    scaling = float(getattr(rotary, "attention_scaling", 1.0))
    cos = g.op("Gather", g.const("rope.cos", (freqs.cos() * scaling).numpy()), positions, axis=0, name="cos")
    sin = g.op("Gather", g.const("rope.sin", (freqs.sin() * scaling).numpy()), positions, axis=0, name="sin")
    return cos, sin


def _causal_mask(g: GraphBuilder, positions: str, T: str) -> str:
    """``[seq, total]`` float: 0 where key position <= query position, float32's lowest value elsewhere
    (as transformers' eager attention adds)."""
    keys = g.op("Range", g.const("zero", 0), T, g.const("step1", 1), name="key_positions")
    later = g.op("Greater", g.op("Unsqueeze", keys, g.const("ax0", [0])),
                 g.op("Unsqueeze", positions, g.const("ax1", [1])), name="future")
    lowest = np.array(np.finfo(np.float32).min, dtype=np.float32)
    return g.op("Where", later, g.const("mask_value", lowest), g.const("fzero", np.float32(0)), name="mask")


def _rms_norm(g: GraphBuilder, x: str, norm: nn.Module, eps: float, name: str) -> str:
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last axis, in float32 (LlamaRMSNorm)."""
    mean = g.op("ReduceMean", g.op("Mul", x, x), g.const("axis_last", [-1]), keepdims=1, name=f"{name}_ms")
    rstd = g.op("Reciprocal", g.op("Sqrt", g.op("Add", mean, g.const("eps", np.float32(eps)))))
    weight = g.const(f"{name}.weight", norm.weight.detach().float().numpy())
    return g.op("Mul", g.op("Mul", x, rstd), weight, name=name)


def _rotate(g: GraphBuilder, x: str, cos: str, sin: str, half: int) -> str:
    """Rotary embedding of ``x [b, heads, seq, head_dim]``: halves ``(x1 c - x2 s, x2 c + x1 s)``."""
    x1, x2 = g.op("Split", x, g.const("halves", [half, half]), axis=-1, outputs=2, name="half")
    first = g.op("Sub", g.op("Mul", x1, cos), g.op("Mul", x2, sin))
    second = g.op("Add", g.op("Mul", x2, cos), g.op("Mul", x1, sin))
    return g.op("Concat", first, second, axis=-1, name="rotated")


def _heads(g: GraphBuilder, x: str, heads: int, head_dim: int) -> str:
    """``[b, seq, heads*head_dim]`` -> ``[b, heads, seq, head_dim]``."""
    return g.op("Transpose", g.op("Reshape", x, g.const("heads_shape", [0, 0, heads, head_dim])), perm=[0, 2, 1, 3])


def _attention(g: GraphBuilder, x: str, attn: nn.Module, i: int, d: _Dims, cos: str, sin: str, mask: str,
               shapes: dict[str, str], level: int) -> str:
    """Grouped-query attention of layer ``i`` over its past and present keys; writes ``present_i_*``."""
    prefix = f"model.layers.{i}.self_attn"
    q = _heads(g, add_linear(g, x, attn.q_proj, f"{prefix}.q_proj", level), d.heads, d.head_dim)
    k = _heads(g, add_linear(g, x, attn.k_proj, f"{prefix}.k_proj", level), d.kv_heads, d.head_dim)
    v = _heads(g, add_linear(g, x, attn.v_proj, f"{prefix}.v_proj", level), d.kv_heads, d.head_dim)
    q = _rotate(g, q, cos, sin, d.head_dim // 2)
    k = _rotate(g, k, cos, sin, d.head_dim // 2)
    keys = g.op("Concat", f"past_key_values.{i}.key", k, axis=2, name=f"present_{i}_key")
    values = g.op("Concat", f"past_key_values.{i}.value", v, axis=2, name=f"present_{i}_value")
    # the `group` query heads of one KV head stacked along the sequence axis: [b, kv, group*seq, dim]
    q = g.op("Reshape", q, g.const("group_shape", [0, d.kv_heads, -1, d.head_dim]))
    scores = g.op("MatMul", q, g.op("Transpose", keys, perm=[0, 1, 3, 2]))
    scores = g.op("Mul", scores, g.const("attn_scale", np.float32(float(attn.scaling))))
    scores = g.op("Add", g.op("Reshape", scores, shapes["scores5"]), mask)
    probs = g.op("Reshape", g.op("Softmax", scores, axis=-1), shapes["scores4"])
    context = g.op("Reshape", g.op("MatMul", probs, values), g.const("context_shape", [0, d.heads, -1, d.head_dim]))
    context = g.op("Reshape", g.op("Transpose", context, perm=[0, 2, 1, 3]),
                   g.const("merge_shape", [0, 0, d.heads * d.head_dim]))
    return add_linear(g, context, attn.o_proj, f"{prefix}.o_proj", level)


def _mlp(g: GraphBuilder, x: str, mlp: nn.Module, prefix: str, level: int) -> str:
    """``down(silu(gate(x)) * up(x))``."""
    gate = add_linear(g, x, mlp.gate_proj, f"{prefix}.gate_proj", level)
    up = add_linear(g, x, mlp.up_proj, f"{prefix}.up_proj", level)
    act = g.op("Mul", gate, g.op("Sigmoid", gate))
    return add_linear(g, g.op("Mul", act, up), mlp.down_proj, f"{prefix}.down_proj", level)


def _embedding(g: GraphBuilder, embedding: nn.Module, head: nn.Module) -> str:
    """Token embeddings ``[b, seq, hidden]``: a float table's rows, or the rows of a quantized tied
    LM head decoded from the head's own stored codes (one copy in the file)."""
    if isinstance(embedding, QuantEmbedding):
        rows = _quantized_rows(g, embedding.head, "lm_head")
        if embedding.embed_scale != 1.0:
            rows = g.op("Mul", rows, g.const("embed_scale", np.float32(embedding.embed_scale)))
        return rows
    if isinstance(embedding, nn.Embedding):
        name = "model.embed_tokens.weight"
        g.shared(name, lambda: embedding.weight.detach().float().numpy())
        return g.op("Gather", name, "input_ids", axis=0, name="embeddings")
    raise TypeError(f"embedding is a {type(embedding).__name__}, not mapped")


def _quantized_rows(g: GraphBuilder, head: QuantLinear, name: str) -> str:
    """Rows ``input_ids`` of ``head``'s weight, ``(code - zero) * scale`` as MatMulNBits and
    DequantizeLinear compute them, read from the same initializers as the head's matmul."""
    qw = head.quantized_weight()
    V, K = qw.shape
    if nbits_block(qw.scheme, K) is not None:
        t = nbits_tensors(qw)
        blocks = K // t.block
        packed = g.op("Gather", g.shared(f"{name}.qweight", lambda: t.B), "input_ids", axis=0)  # [b, s, blocks, bytes]
        codes = _unpack(g, packed, t.bits, [0, 0, blocks, t.block])
        scales = g.op("Reshape", g.shared(f"{name}.scales", lambda: t.scales), g.const("vb", [V, blocks]))
        if t.zero_points is None:
            zero = g.const("nbits_zero", np.float32(2 ** (t.bits - 1)))
        else:
            zp = g.op("Reshape", g.shared(f"{name}.qzeros", lambda: t.zero_points), g.const("vz", [V, -1]))
            zero = _unpack(g, g.op("Gather", zp, "input_ids", axis=0), t.bits, [0, 0, -1])
            zero = g.op("Unsqueeze", g.op("Slice", zero, g.const("z0", [0]), g.const("zb", [blocks]),
                                          g.const("zax", [-1])), g.const("axl", [-1]))
    else:
        t = dequant_tensors(qw)
        codes_t = g.shared(f"{name}.qweight_t", lambda: t.codes)  # [K, V]
        rows = g.op("Transpose", g.op("Gather", codes_t, "input_ids", axis=1), perm=[1, 2, 0])  # [b, s, K]
        group = K if t.block_size == 0 else t.block_size
        codes = g.op("Reshape", g.op("Cast", rows, to=FLOAT), g.const("rows_groups", [0, 0, K // group, group]))
        per_row = qw.scales().expand(V, -1).contiguous()  # [V, G]
        scales = g.const(f"{name}.row_scales", per_row.numpy())
        zeros = qw.zeros()
        zero = g.const("q8_zero", np.float32(0)) if zeros is None else g.op(
            "Unsqueeze", g.op("Gather", g.const(f"{name}.row_zeros", zeros.expand(V, -1).contiguous().numpy()),
                              "input_ids", axis=0), g.const("axl8", [-1]))
    scale = g.op("Unsqueeze", g.op("Gather", scales, "input_ids", axis=0), g.const("axl_s", [-1]))
    values = g.op("Mul", g.op("Sub", codes, zero), scale)
    return g.op("Reshape", values, g.const("rows_shape", [0, 0, K]), name="embeddings")


def _unpack(g: GraphBuilder, packed: str, bits: int, shape: list[int]) -> str:
    """uint8 bytes of ``bits``-bit codes (4: low nibble first; 8: a code a byte) -> float codes of ``shape``."""
    if bits == 8:
        return g.op("Cast", g.op("Reshape", packed, g.const("byte_shape", shape)), to=FLOAT)
    low = g.op("BitwiseAnd", packed, g.const("low_mask", np.uint8(15)))
    high = g.op("BitShift", packed, g.const("four", np.uint8(4)), direction="RIGHT")
    axis = g.const("ax_last", [-1])
    pairs = g.op("Concat", g.op("Unsqueeze", low, axis), g.op("Unsqueeze", high, axis), axis=-1)
    return g.op("Cast", g.op("Reshape", pairs, g.const("nibble_shape", shape)), to=FLOAT)


def _lm_head(g: GraphBuilder, h: str, model: nn.Module, level: int) -> str:
    """Logits: the head's matmul; a float head tied to a float embedding reads the embedding's table."""
    head = model.lm_head
    embedding = model.model.embed_tokens
    if type(head) is nn.Linear and isinstance(embedding, nn.Embedding) and head.weight is embedding.weight:
        table = g.shared("model.embed_tokens.weight", lambda: embedding.weight.detach().float().numpy())
        return g.op("MatMul", h, g.op("Transpose", table, perm=[1, 0]), name="lm_head")
    return add_linear(g, h, head, "lm_head", level)

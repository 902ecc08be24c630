"""A lean forward for Llama-architecture decoders, for generation: the same weights, less machinery.

transformers' eager forward spends about 7 ms per token here outside the matrix products (cache
objects growing by ``cat``, mask construction, keyword plumbing, a dozen small ops per norm and
rotation), more than a 4-bit model's products take. ``LeanDecoder`` runs the model's own linears
(quantized or not), activation and rotary embedding module in a plain loop over a KV cache it
allocates once, with the residual add + RMSNorm, the rotation and single-query attention as fused
CPU ops (``lowbit/kernels/csrc/decode_ops.cpp``). Sibling products reading one input (q/k/v,
gate/up) run as one kernel call on a stacked copy of their layouts (``lowbit.kernels.concatenate``).
It computes what transformers computes up to float32 rounding: greedy tokens match transformers'
loop (tests/evaluate/test_lean_decode.py).

Covered: float32 ``llama``, ``qwen2`` and ``mistral`` models on the CPU whose attention is full causal
(no sliding window in use) and whose MLP is ``down(act(gate(x)) * up(x))``, where lowbit's compiled
kernels load; Gemma 3 text models through ``lean_gemma`` (``lean_decoder`` picks). ``lean_decoder_support``
names what rules a model out; ``generate`` then takes transformers' loop.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SUPPORTED_TYPES = ("llama", "qwen2", "mistral")  # LeanDecoder; Gemma 3 text: lean_gemma.GemmaLeanDecoder
RMS_NORMS = ("LlamaRMSNorm", "Qwen2RMSNorm", "MistralRMSNorm")
SILU = ("SiLU", "SiLUActivation")  # torch's and transformers' modules computing F.silu


def lean_decoder_support(model: nn.Module) -> str | None:
    """None when a lean decoder (``lean_decoder``) runs ``model``, else why not (one line)."""
    from lowbit.evaluate import lean_gemma

    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_TYPES + lean_gemma.SUPPORTED_TYPES:
        covered = ", ".join(SUPPORTED_TYPES + lean_gemma.SUPPORTED_TYPES)
        return f"the lean decode loop covers {covered} models, not {model_type!r}"
    if model_type in lean_gemma.SUPPORTED_TYPES:
        inner = getattr(model, "model", None)
        if inner is None or not all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
            return f"{type(model).__name__} lacks the Gemma 3 module layout the lean decode loop reads"
        return lean_gemma.gemma_support(model) or _kernels_problem()
    if getattr(config, "use_sliding_window", False) or (model_type == "mistral" and config.sliding_window):
        return "the lean decode loop has no sliding-window attention"
    if getattr(config, "pretraining_tp", 1) != 1:
        return "the lean decode loop does not split products by pretraining_tp"
    inner = getattr(model, "model", None)
    if inner is None or not all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return f"{type(model).__name__} lacks the Llama module layout the lean decode loop reads"
    norm = inner.norm
    if type(norm).__name__ not in RMS_NORMS or norm.weight.dtype != torch.float32 or norm.weight.device.type != "cpu":
        return "the lean decode loop runs float32 models on the CPU"
    head_dim = inner.layers[0].self_attn.head_dim
    if head_dim % 8:
        return f"the lean decode loop needs a head size that is a multiple of 8, got {head_dim}"
    return _kernels_problem()


def _kernels_problem() -> str | None:
    from lowbit.kernels import status

    problem = status()
    return None if problem is None else f"the lean decode loop needs lowbit's compiled kernels ({problem})"


def lean_decoder(model: nn.Module, max_length: int):
    """The lean decoder for ``model`` (``LeanDecoder``, or ``lean_gemma.GemmaLeanDecoder`` for Gemma 3),
    once ``lean_decoder_support`` allows it.

    Raises:
        ValueError: ``lean_decoder_support`` rules the model out.
    """
    from lowbit.evaluate import lean_gemma

    reason = lean_decoder_support(model)
    if reason is not None:
        raise ValueError(reason)
    if model.config.model_type in lean_gemma.SUPPORTED_TYPES:
        return lean_gemma.GemmaLeanDecoder(model, max_length)
    return LeanDecoder(model, max_length)


class LeanDecoder:
    """Prefill and decode ``model`` over a KV cache of ``max_length`` positions, one sequence.

    ``decoder(ids)`` appends ``ids`` (int64 ``[1, n]``) after the positions already seen and returns
    the float logits of the last one, ``[1, vocab]``. Inference only, for the model as it is at
    construction: layers with the compiled CPU kernel keep the layout they had then (prepare the
    kernels first).

    Raises:
        ValueError: ``lean_decoder_support`` rules the model out, or the cache would overflow.
    """

    def __init__(self, model: nn.Module, max_length: int) -> None:
        reason = lean_decoder_support(model)
        if reason is not None:
            raise ValueError(reason)
        config = model.config
        self.model = model
        self.ops = torch.ops.lowbit_kernels
        layers = model.model.layers[: config.num_hidden_layers]
        attention = layers[0].self_attn
        self.heads, self.head_dim, self.scaling = config.num_attention_heads, attention.head_dim, attention.scaling
        self.cache = KVCache(len(layers), config.num_key_value_heads, self.head_dim, max_length)
        self.length = 0
        self.steps = [_LayerStep(layer) for layer in layers]
        _stacks_in_huge_pages([p for step in self.steps for p in step.products])
        for step in self.steps:
            step.make_plan()
        self.plan = None  # every layer's decode_layer arguments in one C++ object: a token is one call
        if all(step.plan is not None for step in self.steps):
            self.plan = torch.classes.lowbit_kernels.DecoderPlan()
            for step, keys, values in zip(self.steps, self.cache.keys_t, self.cache.values):
                self.plan.add_layer(step.input_norm, step.input_eps, step.post_norm, step.post_eps, *step.plan,
                                    keys, values)

    @torch.inference_mode()
    def __call__(self, input_ids: Tensor) -> Tensor:
        start, n = self.length, input_ids.shape[1]
        end = start + n
        self.cache.check_room(end)
        inner, ops = self.model.model, self.ops
        hidden = inner.embed_tokens(input_ids)[0].contiguous()  # [n, hidden], updated in place by each norm
        positions = torch.arange(start, end).unsqueeze(0)
        cos, sin = (t[0].contiguous() for t in inner.rotary_emb(hidden, position_ids=positions))  # [n, d]
        if n == 1 and self.plan is not None:  # every layer in one op
            delta = ops.decode_step(self.plan, hidden, cos, sin, start, self.heads, self.scaling)
        else:
            delta = None
            for i, step in enumerate(self.steps):
                x = ops.add_rms_norm(hidden, delta, step.input_norm, step.input_eps)
                delta = self._attention(step, x, cos, sin, i, start)
                x = ops.add_rms_norm(hidden, delta, step.post_norm, step.post_eps)
                gate, up = step.gate_up(x)
                delta = step.down(step.act(gate) * up)[0]
        self.length = end
        last = hidden[-1:].clone()
        final = inner.norm
        return self.model.lm_head(ops.add_rms_norm(last, delta[-1:], final.weight, final.variance_epsilon)).float()

    def _attention(self, step: _LayerStep, x: Tensor, cos: Tensor, sin: Tensor, index: int, start: int) -> Tensor:
        n = x.shape[0]
        q, k, v = (t.reshape(n, -1, self.head_dim) for t in step.qkv(x))
        qk = torch.cat((q, k), dim=1)  # one rotation for both
        self.ops.rotary_(qk, cos, sin)
        return step.o(self.cache.attend(index, qk, v, self.heads, start, self.scaling))[0]


class KVCache:
    """Every layer's keys (stored transposed, as ``decode_attention`` reads them) and values for one
    sequence of up to ``max_length`` positions, and the attention of new positions over them: the
    lean decoders' shared cache."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, max_length: int) -> None:
        capacity = -(-max_length // 8) * 8  # decode_attention reads whole blocks of 8 positions
        self.keys_t = torch.zeros(layers, kv_heads, head_dim, capacity)
        self.values = torch.zeros(layers, kv_heads, capacity, head_dim)
        self.max_length = max_length

    def check_room(self, end: int) -> None:
        """Raises ValueError when positions up to ``end`` do not fit."""
        if end > self.max_length:
            raise ValueError(f"the KV cache holds {self.max_length} positions; {end} were asked for")

    def attend(self, index: int, qk: Tensor, v: Tensor, heads: int, start: int, scale: float,
               window: int | None = None) -> Tensor:
        """Write layer ``index``'s keys (``qk[:, heads:]``, rotated) and values ``v`` ``[n, kv_heads, d]``
        at positions ``start..start+n-1``, and return the attention of the queries ``qk[:, :heads]``
        over every position up to each, or the last ``window`` of them: ``[n, heads * d]``."""
        n, end = qk.shape[0], start + qk.shape[0]
        keys_t, values = self.keys_t[index], self.values[index]
        keys_t[:, :, start:end] = qk[:, heads:].permute(1, 2, 0)
        values[:, start:end] = v.transpose(0, 1)
        if n == 1:
            first = max(0, end - window) if window else 0  # a position sees the window ending at itself
            return torch.ops.lowbit_kernels.decode_attention(qk[0, :heads], keys_t, values, end, scale,
                                                             first).reshape(1, -1)
        mask = None
        if start or window:
            query, key = torch.arange(start, end).unsqueeze(1), torch.arange(end).unsqueeze(0)
            mask = key <= query
            if window:
                mask &= query - key < window
        out = F.scaled_dot_product_attention(
            qk[:, :heads].transpose(0, 1).unsqueeze(0), keys_t[:, :, :end].transpose(1, 2).unsqueeze(0),
            values[:, :end].unsqueeze(0), attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=True)
        return out[0].transpose(0, 1).reshape(n, -1)


class _LayerStep:
    """One decoder layer's products and norm parameters, and its ``decode_layer`` arguments (``plan``:
    weights, meta and parts, see ``csrc/decode_ops.cpp``) when every product and the activation allow."""

    def __init__(self, layer: nn.Module) -> None:
        attention, mlp = layer.self_attn, layer.mlp
        self.input_norm, self.input_eps = layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon
        self.post_norm = layer.post_attention_layernorm.weight
        self.post_eps = layer.post_attention_layernorm.variance_epsilon
        self.qkv = _Product([attention.q_proj, attention.k_proj, attention.v_proj])
        self.o = _Product([attention.o_proj])
        self.gate_up = _Product([mlp.gate_proj, mlp.up_proj])
        self.down = _Product([mlp.down_proj])
        self.act = mlp.act_fn
        self.products = (self.qkv, self.o, self.gate_up, self.down)
        self.plan = None

    def make_plan(self) -> None:
        """Fill ``plan`` from the products as they are bound now."""
        products = self.products
        if type(self.act).__name__ in SILU and all(p.parts is not None for p in products):
            weights = [t for p in products for part in p.parts for t in part[0]]
            meta = [m for p in products for part in p.parts for m in part[1]]
            self.plan = (weights, meta, [len(p.parts) for p in products])


class _Product:
    """``x [n, in] -> [m(x) for m in modules]``: one compiled-kernel call on a stacked copy of their
    layouts when every module is a float32 ``QuantLinear`` on lowbit's CPU kernels with compatible
    formats, else the modules themselves. ``parts`` describes it for ``decode_layer`` (None: it cannot)."""

    def __init__(self, modules: list[nn.Module]) -> None:
        from lowbit.kernels import cpu, vq
        from lowbit.nn import QuantLinear

        self.modules = modules
        self.sizes = [m.out_features for m in modules]
        self.product: Callable[[Tensor], Tensor] | None = None
        self.layout = self.bias = None
        self.stacked = False  # whether layout is this product's own copy (of several layers' layouts)
        self.parts: list[tuple[list[Tensor | None], list[int]]] | None = None
        prepared = [m.prepared for m in modules if isinstance(m, QuantLinear)]
        if len(prepared) == len(modules) and all(p is not None and isinstance(p.layout, cpu.PreparedWeight)
                                                 for p in prepared) \
                and all(m.compute_dtype in (None, torch.float32) for m in modules):
            stacked = prepared[0].layout if len(modules) == 1 else cpu.concatenate([p.layout for p in prepared])
            if stacked is not None:
                biases = [m.bias if m.bias is not None else torch.zeros(m.out_features) for m in modules]
                bias = None if all(m.bias is None for m in modules) else torch.cat([b.float() for b in biases])
                self.stacked = len(modules) > 1
                self.bind(stacked, bias)
        elif len(prepared) == len(modules) and all(p is not None and isinstance(p.layout, vq.PreparedVq)
                                                   and p.layout.sparse is None for p in prepared) \
                and all(m.compute_dtype in (None, torch.float32) for m in modules):
            # codebook layers: one decode_layer part each (their products are not stacked)
            self.parts = [_vq_part(p.layout, m.bias) for p, m in zip(prepared, modules)]
        elif all(type(m) is nn.Linear and m.weight.dtype == torch.float32 for m in modules):
            self.parts = [([m.weight, None, None, None, None, m.bias], [2, 0, 0, 0, 0]) for m in modules]

    def bind(self, layout, bias: Tensor | None) -> None:
        """Compute with ``layout`` (a lowbit CPU layout of the modules' stacked weights) from now on."""
        from lowbit.kernels import cpu

        self.layout, self.bias = layout, bias
        self.product = cpu.bind(layout, bias)
        # decode_layer's parts have no sparse term: such a layer takes the Python layer loop
        self.parts = None if layout.sparse is not None else [_layout_part(layout, bias)]

    def __call__(self, x: Tensor) -> list[Tensor]:
        if self.product is not None:
            return self.product(x).split(self.sizes, dim=-1)
        return [m(x) for m in self.modules]


def _stacks_in_huge_pages(products: list[_Product]) -> None:
    """Move the stacked copies the products made into one huge-page mapping, as ``prepare_kernels``
    moves the layers' own layouts (``lowbit.kernels.huge_pages``)."""
    from lowbit.kernels.huge_pages import in_huge_pages

    stacked = [p for p in products if p.stacked]
    for product, layout in zip(stacked, in_huge_pages([p.layout for p in stacked])):
        product.bind(layout, product.bias)


def _vq_part(layout, bias: Tensor | None) -> tuple[list[Tensor | None], list[int]]:
    """A ``vq`` layout (``lowbit.kernels.vq.PreparedVq``) as one ``decode_layer`` part (kind 3: shared
    codebooks, 4: per row)."""
    bias = None if bias is None else bias.float().contiguous()
    scheme = layout.scheme
    return ([layout.codes, layout.tables, layout.tables_t, layout.codes_t, None, bias],
            [3 if layout.shared else 4, scheme.bits, scheme.vector_dim, layout.groups, layout.shape[0]])


def _layout_part(layout, bias: Tensor | None) -> tuple[list[Tensor | None], list[int]]:
    """A stacked lowbit layout as one ``decode_layer`` part (kind 0: float activations, 1: integer)."""
    from lowbit.kernels.cpu import INTEGER_ACTIVATIONS

    bias = None if bias is None else bias.float().contiguous()
    bits = layout.scheme.bits
    if layout.activations in INTEGER_ACTIVATIONS:
        return ([layout.codes, layout.scale, layout.corr, layout.zsub, layout.fmin, bias],
                [1, bits, layout.group, layout.shape[0], INTEGER_ACTIVATIONS[layout.activations]])
    return ([layout.codes, layout.scale, layout.lut, layout.zsub, layout.fmin, bias],
            [0, bits, layout.group, layout.group_padded, layout.mode])

"""Where a model's decoder blocks and their linear layers are, one record per architecture.

The sequential pipeline needs four facts about a model and nothing else: the ``nn.ModuleList``
of decoder blocks, what runs before them, (for true-sequential GPTQ) the order in which a
block's linears consume each other's outputs, and (for AWQ) which op feeds which linears so an
input scale can be folded into it. Each is a dotted path, so a new architecture is one
table entry here and no code elsewhere (compare IST-DASLab/gptq's per-model ``opt_sequential`` /
``llama_sequential`` copies).

Linears inside a block are found by walking the block, so a linear missing from
``sequential_groups`` is still quantized; the groups only order the true-sequential passes.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

# Llama-style blocks: attention projections read the block input, o_proj reads attention, the
# gate/up pair reads the post-attention norm, down_proj reads their product.
_LLAMA_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
# v_proj -> o_proj folds only without grouped-query attention (v has as many outputs as o inputs);
# the pipeline checks the sizes and skips the pair otherwise. down_proj reads act(gate) * up, which
# is linear in up's outputs.
_LLAMA_SCALING = (
    ("input_layernorm", _QKV),
    ("self_attn.v_proj", ("self_attn.o_proj",)),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp.up_proj", ("mlp.down_proj",)),
)
# Gemma 3 normalises attention's output (post_attention_layernorm) and feeds the MLP from
# pre_feedforward_layernorm; its RMSNorm multiplies by (1 + weight).
_GEMMA3_SCALING = (
    ("input_layernorm", _QKV),
    ("self_attn.v_proj", ("self_attn.o_proj",)),
    ("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp.up_proj", ("mlp.down_proj",)),
)


@dataclass(frozen=True)
class Architecture:
    """The block structure of one family of Hugging Face causal LMs.

    Fields:
        model_types: the ``config.model_type`` values this record describes.
        blocks: dotted path of the ``nn.ModuleList`` of decoder blocks, e.g. ``"model.layers"``.
        embed: dotted paths of the modules that run before the blocks (embeddings, input
            projections); the pipeline runs them through the model's own forward.
        sequential_groups: names inside a block of its linears, grouped in true-sequential order:
            a group's inputs depend only on the groups before it.
        scaling_groups: ``(prev, consumers)`` pairs inside a block: ``prev`` (a norm or a linear)
            produces exactly the input of every linear in ``consumers``, through ops that commute
            with a positive per-channel scale, so AWQ can fold ``1/s`` into it.
        norm_weight_offset: the block's norms multiply by ``offset + weight`` (1.0 for Gemma).
    """

    model_types: tuple[str, ...]
    blocks: str
    embed: tuple[str, ...]
    sequential_groups: tuple[tuple[str, ...], ...]
    scaling_groups: tuple[tuple[str, tuple[str, ...]], ...] = ()
    norm_weight_offset: float = 0.0

    def block_list(self, model: nn.Module) -> nn.ModuleList:
        """The model's decoder blocks. Raises ``ValueError`` when ``blocks`` is not a ModuleList there."""
        try:
            blocks = model.get_submodule(self.blocks)
        except AttributeError:
            blocks = None
        if not isinstance(blocks, nn.ModuleList):
            raise ValueError(f"{type(model).__name__} has no decoder block list at {self.blocks!r} "
                             f"(expected for model types {', '.join(self.model_types)})")
        return blocks


ARCHITECTURES: dict[str, Architecture] = {}


def _register(arch: Architecture) -> None:
    for model_type in arch.model_types:
        if model_type in ARCHITECTURES:
            raise ValueError(f"architecture for model type {model_type!r} is already registered")
        ARCHITECTURES[model_type] = arch


_register(Architecture(("llama", "mistral", "qwen2"), "model.layers", ("model.embed_tokens",),
                       _LLAMA_GROUPS, _LLAMA_SCALING))
_register(Architecture(("gemma3_text",), "model.layers", ("model.embed_tokens",), _LLAMA_GROUPS,
                       _GEMMA3_SCALING, norm_weight_offset=1.0))
# Gemma 3 with its vision tower: the text decoder sits one level deeper. Linears of the vision
# tower and projector lie outside the blocks (see ``quantize_sequential`` for how those are handled).
_register(Architecture(("gemma3",), "model.language_model.layers", ("model.language_model.embed_tokens",),
                       _LLAMA_GROUPS, _GEMMA3_SCALING, norm_weight_offset=1.0))
# OPT-350m's optional ``project_in``/``project_out`` linears sit outside the blocks.
_register(Architecture(
    ("opt",), "model.decoder.layers", ("model.decoder.embed_tokens", "model.decoder.embed_positions"),
    (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.out_proj",), ("fc1",), ("fc2",)),
    (("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
     ("self_attn.v_proj", ("self_attn.out_proj",)),
     ("final_layer_norm", ("fc1",)),
     ("fc1", ("fc2",))),  # OPT's activation is ReLU, which commutes with a positive scale
))
# GPT-2's linears are transformers ``Conv1D`` modules (weight stored [in, out]); the pipeline
# quantizes them as linears of the transposed weight.
_register(Architecture(
    ("gpt2",), "transformer.h", ("transformer.wte", "transformer.wpe"),
    (("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
    (("ln_1", ("attn.c_attn",)), ("ln_2", ("mlp.c_fc",))),  # c_fc -> c_proj passes GELU: no fold
))


def architecture_for(model: nn.Module) -> Architecture:
    """The ``Architecture`` of a Hugging Face model, looked up by ``model.config.model_type``.

    Raises:
        ValueError: the model has no ``config.model_type``, its type is not registered, or its
            block list is not where the record says.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is None:
        raise ValueError(f"{type(model).__name__} has no config.model_type; the sequential pipeline needs a "
                         "Hugging Face model")
    arch = ARCHITECTURES.get(model_type)
    if arch is None:
        raise ValueError(f"unsupported architecture {model_type!r} (model_type); supported: "
                         f"{', '.join(sorted(ARCHITECTURES))}")
    arch.block_list(model)
    return arch

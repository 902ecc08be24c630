"""GGUF metadata: an architecture's hyper-parameters and its tokenizer, as llama.cpp reads them.

llama.cpp rebuilds a model from these keys alone (there is no config.json in a GGUF), so each
value here mirrors what llama.cpp's ``convert_hf_to_gguf.py`` writes for that architecture
(``LlamaModel``, ``Gemma3Model``, ``Qwen2Model`` and ``TextModel.set_gguf_parameters``). Where llama.cpp hard-codes
something the Hugging Face config states (Gemma 3's every-6th-layer global attention, its
attention scale), we check the config agrees and raise ``ValueError`` when it does not, rather
than write a file llama.cpp would run differently.

Tokenizers are read from the fast (``tokenizers``) backend of the Hugging Face tokenizer:

* byte-level BPE (SmolLM2, Llama 3, Qwen2): ``tokenizer.ggml.model = "gpt2"`` with the merges and a
  pre-tokenizer name, found like llama.cpp finds it: the sha256 of the ids of a probe text;
* BPE with byte fallback over ``▁``-spelled text (Gemma, Llama 2): ``"llama"``, SentencePiece
  style, where llama.cpp merges by score. A normal token's score is minus its rank among the
  normal tokens (the order of SentencePiece's scores: this reproduces Gemma 3's exactly), byte
  tokens score 0, control and user-defined tokens -1000, as in llama.cpp's own files.

Rows of the embedding beyond the tokenizer's vocabulary become ``[PAD<i>]`` tokens of type UNUSED,
as ``convert_hf_to_gguf.py`` pads them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from hashlib import sha256
from typing import Any

from gguf import MODEL_ARCH, GGUFWriter, RopeScalingType, TokenType

from lowbit.sources import needs_bos


@dataclass(frozen=True)
class GGUFArchitecture:
    """How one Hugging Face ``model_type`` becomes a llama.cpp architecture.

    Fields:
        arch: llama.cpp's architecture (names the ``{arch}.*`` keys and the tensor names).
        add_hparams: writes the ``{arch}.*`` hyper-parameter keys from the HF config; raises
            ``ValueError`` for a config llama.cpp cannot run as-is.
        permute_qk: reorder q/k projection rows from HF's rotate-half RoPE layout to GGML's
            interleaved pairs (``LlamaModel.permute`` in convert_hf_to_gguf.py).
        norm_offset: added to every ``*norm.weight``; Gemma's RMSNorm computes ``x * (1 + w)``
            where llama.cpp computes ``x * w``.
    """

    arch: MODEL_ARCH
    add_hparams: Callable[[GGUFWriter, Any], None]
    permute_qk: bool = False
    norm_offset: float = 0.0


def _rope_parameters(config: Any, layer_type: str | None = None) -> dict[str, Any]:
    """The RoPE dict of ``config`` (transformers 5 ``rope_parameters``; per layer type for Gemma 3)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if layer_type is not None:
        params = dict(params.get(layer_type) or {})
    if "rope_theta" not in params and getattr(config, "rope_theta", None) is not None:
        params["rope_theta"] = config.rope_theta
    return params


def _add_rope_scaling(writer: GGUFWriter, params: dict[str, Any]) -> None:
    """``rope.scaling.*`` for linear scaling; none for plain RoPE; ``ValueError`` for other kinds."""
    rope_type = params.get("rope_type") or "default"
    if rope_type == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(params["factor"]))
    elif rope_type != "default":
        raise ValueError(f"RoPE type {rope_type!r} is not supported by the GGUF export; supported: default, linear")


def _require(config: Any, attr: str, expected: Any) -> None:
    value = getattr(config, attr, None)
    if value != expected:
        raise ValueError(f"config.{attr} is {value!r}, but llama.cpp's {config.model_type} runs {expected!r}; "
                         "this model cannot be exported to GGUF as-is")


def _add_common(writer: GGUFWriter, config: Any) -> None:
    """The keys every decoder has (``TextModel.set_gguf_parameters``)."""
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _llama_hparams(writer: GGUFWriter, config: Any) -> None:
    _require(config, "hidden_act", "silu")
    _add_common(writer, config)
    rope = _rope_parameters(config)
    writer.add_rope_freq_base(rope["rope_theta"])
    _add_rope_scaling(writer, rope)
    writer.add_vocab_size(config.vocab_size)
    head_dim = _head_dim(config)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:  # llama.cpp's default head size
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def _gemma3_hparams(writer: GGUFWriter, config: Any) -> None:
    _require(config, "hidden_activation", "gelu_pytorch_tanh")
    _require(config, "attn_logit_softcapping", None)  # Gemma 2 had it; llama.cpp's gemma3 has none
    n, head_dim = config.num_hidden_layers, _head_dim(config)
    layer_types = list(getattr(config, "layer_types", None) or ["full_attention"] * n)
    sliding = "sliding_attention" in layer_types
    # llama.cpp's gemma3 makes layer i global iff (i + 1) % 6 == 0 whenever a sliding window is set
    pattern = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n)]
    if sliding and layer_types != pattern:
        raise ValueError(f"config.layer_types {layer_types} is not llama.cpp's Gemma 3 pattern "
                         "(every 6th layer global, the rest sliding); it cannot be exported to GGUF as-is")
    # llama.cpp's attention scale: 1/sqrt(head_dim), or 1/sqrt(hidden/heads) for the 62-layer (27B) model
    _require(config, "query_pre_attn_scalar", config.hidden_size // config.num_attention_heads if n == 62 else head_dim)
    _add_common(writer, config)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    full = _rope_parameters(config, "full_attention")
    writer.add_rope_freq_base(full["rope_theta"])
    _add_rope_scaling(writer, full)
    if sliding:
        local = _rope_parameters(config, "sliding_attention")
        if (local.get("rope_type") or "default") != "default":
            raise ValueError(f"RoPE type {local['rope_type']!r} on sliding layers is not supported by the GGUF export")
        writer.add_rope_freq_base_swa(local["rope_theta"])
        writer.add_sliding_window(config.sliding_window)
    if getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(config.final_logit_softcapping)


def _qwen2_hparams(writer: GGUFWriter, config: Any) -> None:
    """``Qwen2Model``: ``TextModel``'s keys; llama.cpp's qwen2 attends to the whole context (no window)
    and rotates q/k in HF's rotate-half (NEOX) layout, so nothing is permuted; q/k/v biases are
    ordinary ``attn_{q,k,v}.bias`` tensors."""
    _require(config, "hidden_act", "silu")
    _require(config, "use_sliding_window", False)
    _add_common(writer, config)
    rope = _rope_parameters(config)
    writer.add_rope_freq_base(rope["rope_theta"])
    _add_rope_scaling(writer, rope)
    head_dim = _head_dim(config)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


ARCHITECTURES: dict[str, GGUFArchitecture] = {
    "llama": GGUFArchitecture(MODEL_ARCH.LLAMA, _llama_hparams, permute_qk=True),
    "gemma3_text": GGUFArchitecture(MODEL_ARCH.GEMMA3, _gemma3_hparams, norm_offset=1.0),
    "qwen2": GGUFArchitecture(MODEL_ARCH.QWEN2, _qwen2_hparams),
}


def architecture_of(model: Any) -> GGUFArchitecture:
    """The ``GGUFArchitecture`` of a Hugging Face causal LM, by ``config.model_type``.

    Raises:
        ValueError: the model type is not one the GGUF export supports (the message lists them).
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(f"GGUF export does not support architecture {model_type!r} "
                         f"({type(model).__name__}); supported model types: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[model_type]


# --- tokenizer ---------------------------------------------------------------------------------

# convert_hf_to_gguf.py's probe text: the sha256 of its token ids names the BPE pre-tokenizer.
_PROBE = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\U0001f680 (normal) \U0001f636\u200d"
    "\U0001f32b\ufe0f (multiple emojis concatenated) \u2705 \U0001f999\U0001f999 3 33 333 3333 "
    "33333 333333 3333333 33333333 3.3 3..3 3...3 \u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796"
    "\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785\U0001f601 ?\u6211\u60f3\u5728apple\u5de5\u4f5c1"
    "314151\u5929\uff5e ------======= \u043d\u0435\u0449\u043e \u043d\u0430 \u0411\u044a\u043b"
    "\u0433\u0430\u0440\u0441\u043a\u0438 ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told h"
    "e's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
# sha256 of the probe's ids -> llama.cpp pre-tokenizer name (from get_vocab_base_pre)
_BPE_PRE_BY_HASH = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # HuggingFaceTB/SmolLM-135M
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # openai-community/gpt2
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # meta-llama/Meta-Llama-3-8B
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen/Qwen1.5-7B, Qwen2.5's too
}
# Qwen2's split before byte-level BPE, the regex of llama.cpp's "qwen2" pre-tokenizer (llama-vocab.cpp)
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
_SPM_SPACE = "\u2581"


def _backend(tokenizer: Any) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"{type(tokenizer).__name__} has no fast (tokenizers) backend; the GGUF export reads "
                         "the vocabulary from it (load the tokenizer with AutoTokenizer)")
    return json.loads(backend.to_str())


def _components(node: dict[str, Any] | None) -> list[dict[str, Any]]:
    """A normalizer/pre-tokenizer and, for a ``Sequence``, its members, flattened."""
    if not node:
        return []
    members = node.get("pretokenizers") or node.get("normalizers")
    return [node] if members is None else [c for m in members for c in _components(m)]


def _bpe_pre(tokenizer: Any, pre_tokenizer: list[dict[str, Any]]) -> str:
    """llama.cpp's name for this byte-level BPE pre-tokenizer; ``ValueError`` when unknown."""
    digest = sha256(str(tokenizer.encode(_PROBE, add_special_tokens=False)).encode()).hexdigest()
    if digest in _BPE_PRE_BY_HASH:
        return _BPE_PRE_BY_HASH[digest]
    # A lone ByteLevel with its built-in regex splits text exactly as llama.cpp's "gpt-2" does.
    if [c["type"] for c in pre_tokenizer] == ["ByteLevel"] and pre_tokenizer[0].get("use_regex", True):
        return "gpt-2"
    # Qwen2's regex, then ByteLevel without its own: what llama.cpp's "qwen2" does, whatever the vocabulary
    if ([c["type"] for c in pre_tokenizer] == ["Split", "ByteLevel"]
            and pre_tokenizer[0].get("pattern", {}).get("Regex") == _QWEN2_SPLIT
            and pre_tokenizer[0].get("behavior") == "Isolated" and not pre_tokenizer[1].get("use_regex", True)):
        return "qwen2"
    raise ValueError(f"unknown BPE pre-tokenizer (probe hash {digest}); llama.cpp would split text differently. "
                     "Add its llama.cpp name to _BPE_PRE_BY_HASH in lowbit/gguf/metadata.py")


def _vocab_by_id(tokenizer: Any, n_vocab: int) -> list[str | None]:
    vocab = tokenizer.get_vocab()
    if max(vocab.values(), default=-1) >= n_vocab:
        raise ValueError(f"tokenizer has ids up to {max(vocab.values())} but the model embeds only {n_vocab} "
                         "tokens; pass the tokenizer that belongs to this model")
    tokens: list[str | None] = [None] * n_vocab
    for text, i in vocab.items():
        tokens[i] = text
    return tokens


def _add_gpt2_vocab(writer: GGUFWriter, tokenizer: Any, backend: dict[str, Any], n_vocab: int) -> None:
    pre = _components(backend.get("pre_tokenizer"))
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i, text in enumerate(_vocab_by_id(tokenizer, n_vocab)):
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
            continue
        tokens.append(text)
        if i in added:
            types.append(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
        else:
            types.append(TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_bpe_pre(tokenizer, pre))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    merges = backend["model"].get("merges") or []
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    byte_level = next(c for c in pre if c["type"] == "ByteLevel")
    writer.add_add_space_prefix(bool(byte_level.get("add_prefix_space", False)))


def _add_spm_vocab(writer: GGUFWriter, tokenizer: Any, backend: dict[str, Any], n_vocab: int) -> None:
    added = tokenizer.added_tokens_decoder
    tokens, scores, types = [], [], []
    n_normal = 0
    for i, text in enumerate(_vocab_by_id(tokenizer, n_vocab)):
        if text is None:  # _create_vocab_sentencepiece's padding
            tokens.append(f"[PAD{i}]")
            scores.append(-10000.0)
            types.append(TokenType.UNUSED)
        elif i in added:
            special = added[i].special
            # llama.cpp matches user-defined tokens in raw text, where spaces are still spaces
            tokens.append(text if special else text.replace(_SPM_SPACE, " "))
            scores.append(-1000.0)
            types.append(TokenType.CONTROL if special else TokenType.USER_DEFINED)
        elif _BYTE_TOKEN.match(text):
            tokens.append(text)
            scores.append(0.0)
            types.append(TokenType.BYTE)
        else:
            tokens.append(text)
            scores.append(-float(n_normal))
            types.append(TokenType.NORMAL)
            n_normal += 1
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    prepends = any(c["type"] == "Prepend" for c in _components(backend.get("normalizer")))
    writer.add_add_space_prefix(prepends)


def add_tokenizer(writer: GGUFWriter, tokenizer: Any, n_vocab: int) -> None:
    """Write the ``tokenizer.*`` keys for a Hugging Face fast tokenizer and an ``n_vocab``-row embedding.

    Writes the vocabulary (and merges or scores), token types, the bos/eos/unk/pad ids the
    tokenizer has, whether it adds BOS/EOS (found by encoding a probe, since transformers 5 can
    report ``add_bos_token=False`` and still prepend it) and its chat template.

    Raises:
        ValueError: no fast backend, a tokenizer model other than BPE, a byte-level BPE whose
            pre-tokenizer llama.cpp does not know, or more token ids than embedding rows.
    """
    backend = _backend(tokenizer)
    kind = backend["model"].get("type")
    if kind == "BPE" and any(c["type"] == "ByteLevel" for c in _components(backend.get("pre_tokenizer"))):
        _add_gpt2_vocab(writer, tokenizer, backend, n_vocab)
    elif kind == "BPE" and backend["model"].get("byte_fallback"):
        _add_spm_vocab(writer, tokenizer, backend, n_vocab)
    else:
        raise ValueError(f"tokenizer model {kind!r} is not supported by the GGUF export; supported: byte-level "
                         "BPE (GPT-2 style) and BPE with byte fallback (SentencePiece style)")
    for key, token_id in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                          ("unk", tokenizer.unk_token_id), ("pad", tokenizer.pad_token_id)):
        if token_id is not None:
            getattr(writer, f"add_{key}_token_id")(token_id)
    writer.add_add_bos_token(needs_bos(tokenizer))
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    writer.add_add_eos_token(tokenizer.eos_token_id is not None and bool(ids) and ids[-1] == tokenizer.eos_token_id)
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        writer.add_chat_template(tokenizer.chat_template)

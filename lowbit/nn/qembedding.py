"""``QuantEmbedding``: a token embedding that reads a quantized LM head's codes, so tied weights stay tied.

Models such as SmolLM2 and Gemma 3 use one ``[vocab, hidden]`` matrix as input embedding and LM
head. Once the head is a ``QuantLinear``, the embedding looks its rows up in the head's codes: the
matrix is stored once, in memory and in checkpoints (under the head's name), and a lookup decodes
only the rows of the tokens it reads. Gemma's ``embed_scale`` (sqrt(hidden)) is kept.
"""

from __future__ import annotations

from torch import Tensor, nn

from lowbit.nn.qlinear import QuantLinear
from lowbit.nn.replace import set_submodule


class QuantEmbedding(nn.Module):
    """``embedding(ids) = dequantize(head.weight)[ids] * embed_scale``, decoding only the rows read."""

    def __init__(self, head: QuantLinear, embed_scale: float = 1.0, padding_idx: int | None = None) -> None:
        super().__init__()
        self.__dict__["head"] = head  # not a submodule: its tensors are stored under the head's name only
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features
        self.embed_scale = float(embed_scale)
        self.padding_idx = padding_idx

    def forward(self, ids: Tensor) -> Tensor:
        rows = self.head.quantized_weight().dequantize_rows(ids.reshape(-1))
        out = rows.reshape(*ids.shape, self.embedding_dim)
        return out * self.embed_scale if self.embed_scale != 1.0 else out

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, tied to a {self.head.scheme.describe()} head, "
                f"embed_scale={self.embed_scale:g}")


def tie_quantized_embedding(model: nn.Module) -> str | None:
    """Where ``model`` ties its input embedding to an LM head that is now a ``QuantLinear``, replace the
    embedding by a ``QuantEmbedding`` on the head's codes; returns the embedding's name, else None.

    The model's config then says ``tie_word_embeddings=False``: the tie is the shared codes, and
    transformers must not try to tie float parameters that no longer exist.
    """
    config = getattr(model, "config", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not (isinstance(head, QuantLinear) and isinstance(embedding, nn.Embedding)
            and getattr(config, "tie_word_embeddings", False)):
        return None
    name = next(n for n, m in model.named_modules() if m is embedding)
    scale = float(getattr(embedding, "scalar_embed_scale", 1.0))
    set_submodule(model, name, QuantEmbedding(head, scale, embedding.padding_idx))
    config.tie_word_embeddings = False
    return name

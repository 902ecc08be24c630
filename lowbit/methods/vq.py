"""Vector and product quantization with GPTQ error feedback (GPTVQ).

van Baalen, Kuzmin, Nagel, Couperus, Bastoul, Mahurin, Blankevoort, Whatmough, "GPTVQ: The
Blessing of Dimensionality for LLM Quantization" (2024), Algorithm 1. A code stands for
``vector_dim`` consecutive weights of a row; codebooks of ``2**bits`` vectors are learned from the
weights themselves, so ``d``-dimensional codes place their levels where the weight *pairs, quads ...*
actually lie instead of on a product grid. Three steps per weight ``[out, in]`` with its inputs'
Hessian ``H``:

1. **Codebooks** by Hessian-weighted k-means (``lowbit.methods.kmeans``) on the current weights of
   the columns a codebook serves, when the first of them comes up in GPTQ's column loop; a
   coordinate in column ``j`` weighs ``1 / Hinv[j, j]^2``, GPTQ's cost of an error in that column
   (``Hinv`` the upper Cholesky factor of ``H^-1``).
2. **Assignment with error feedback**: GPTQ's column loop (``gptq_column_loop``) visits the columns
   in order; at the first column of a vector each row picks the codebook vector nearest to its
   current ``vector_dim`` values (same weighted distance), and every column's rounding error is
   pushed onto the columns not yet quantized by the OBS update, exactly as for a scalar grid (the
   sequential updates within a vector equal GPTVQ's blockwise update).
3. **Codebook refinement**: with the codes fixed, the codebook values minimise the layer's output
   error ``tr((W - Q) H (W - Q)^T)``, a linear least-squares problem in the codebook entries, solved
   by a few steps of Jacobi-preconditioned conjugate gradients from the k-means values (each step
   never raises the error).

Which weights a codebook serves is the scheme's business (``QuantizedWeight``'s ``codebook`` field):
per tensor (``vq``), per group of input columns shared by every row (``shared_codebook``: product
quantization, registered as ``pq``), or per scale row. The codebooks' float16 values count in bpw.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lowbit.formats import FormatName
from lowbit.methods.gptq import GPTQConfig, check_hessian, gptq_column_loop, inverse_hessian_factor
from lowbit.methods.kmeans import weighted_kmeans
from lowbit.methods.registry import InputStatistics, Statistic, per_weight, register_method
from lowbit.methods.rtn import check_finite
from lowbit.qweight import QuantizedWeight, WeightLayout
from lowbit.scheme import Granularity, QuantScheme


@dataclass(frozen=True)
class VQConfig:
    """The knobs of ``gptvq_quantize``."""

    damp: float = 0.01  # as GPTQ: fraction of mean diag(H) added to the diagonal
    kmeans_iterations: int = 8  # Lloyd iterations per codebook; refinement fits the values afterwards
    kmeans_samples: int = 16384  # vectors a codebook's k-means sees at most (a seeded draw): 64 per centroid
    # of a 256-entry codebook; refinement then fits the values to every vector
    refine_iterations: int = 25  # conjugate-gradient steps of the codebook refinement (0: none)
    seed: int = 0  # k-means++ initialisation
    block_size: int = 128  # GPTQ's lazy batch width; changes speed, not the result

    def __post_init__(self) -> None:
        if not self.damp > 0:
            raise ValueError(f"damp must be > 0 (a fraction of mean diag(H), e.g. 0.01), got {self.damp!r}")
        for name in ("kmeans_iterations", "kmeans_samples", "refine_iterations", "seed"):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if not (isinstance(self.block_size, int) and self.block_size >= 1):
            raise ValueError(f"block_size must be an int >= 1 (e.g. 128), got {self.block_size!r}")


@dataclass(frozen=True)
class _Books:
    """How a weight ``[out, n]``'s vectors map to its codebooks: ``G`` column groups of ``width``
    columns; within a group, rows share one codebook (``per_row`` False) or each has its own."""

    G: int
    width: int
    per_row: bool

    @classmethod
    def of(cls, layout: WeightLayout) -> _Books:
        s = layout.scheme
        out, n = layout.shape
        if s.granularity is Granularity.TENSOR:
            return cls(1, n, False)
        G = layout.rows[1]
        return cls(G, n // G, not s.shared_codebook)

    def index(self, g: int, out: int, device: torch.device) -> Tensor:
        """Codebook of each row ``[out]`` in column group ``g``, as the ``codebook`` field orders them."""
        if self.per_row:
            return torch.arange(out, device=device) * self.G + g
        return torch.full((out,), g, device=device)


def check_vq_scheme(scheme: QuantScheme, method: str) -> None:
    """One line unless ``scheme`` is a ``vq`` codebook scheme that ``method`` (vq or pq) produces."""
    if scheme.format is not FormatName.VQ:
        raise ValueError(f"method {method} produces vq codebooks; the scheme is {scheme.describe()} "
                         "(use --method vq/pq with --vq-dim D --codebook-bits K)")
    if (method == "pq") != scheme.shared_codebook:
        want = "shared_codebook (one codebook per group of input columns)" if method == "pq" else \
            "codebooks per tensor or per scale row, not shared_codebook (that is method pq)"
        raise ValueError(f"method {method} needs {want}; the scheme is {scheme.describe()}")


@torch.no_grad()
def gptvq_quantize(weight: Tensor, H: Tensor, scheme: QuantScheme, config: VQConfig = VQConfig(), *,
                   layer: str = "weight") -> QuantizedWeight:
    """Quantize ``weight [out, in]`` to a ``vq`` scheme with GPTVQ given its inputs' Hessian ``H``.

    Columns that never see input (``H[j, j] == 0``) are zeroed first, as GPTQ does. Float32 on
    ``weight``'s device; deterministic for ``config.seed``. ``H`` is not modified.

    Raises:
        ValueError: a scheme that is not ``vq``, NaN/Inf in ``weight`` or ``H``, shapes that do not
            fit (``vector_dim`` or the group size not dividing ``in``, a codebook with more vectors
            than it serves), or an ``H`` that dampening cannot make positive definite.
    """
    if scheme.format is not FormatName.VQ:
        raise ValueError(f"GPTVQ produces vq codebooks; the scheme is {scheme.describe()}")
    check_finite(weight, layer)
    layout = WeightLayout(scheme, tuple(weight.shape))
    out, n = layout.shape
    check_hessian(H, n, layer)
    H = H.to(device=weight.device, dtype=torch.float32, copy=True)
    dead = H.diagonal() == 0
    H.diagonal().masked_fill_(dead, 1.0)
    W = weight.float().clone()
    W[:, dead] = 0.0
    Hinv = inverse_hessian_factor(H, GPTQConfig(damp=config.damp), layer)
    H.diagonal().add_(config.damp * H.diagonal().mean())  # the objective refinement minimises, as damped
    columns = _VectorColumns(layout, Hinv.diagonal() ** -2, config)
    gptq_column_loop(W.clone(), Hinv, config.block_size, columns)
    codebook = refine_codebook(W, H, columns.codebook, columns.flat_index(), config.refine_iterations)
    codes = columns.codes.to(torch.uint8)
    return QuantizedWeight.from_codebook(codes, codebook, scheme)


class _VectorColumns:
    """``ColumnQuantizer`` of vector codes: learns a column group's codebook(s) when its first column
    comes up, picks each row's vector at the first column of a vector, returns its values column by
    column; keeps codes and codebooks."""

    def __init__(self, layout: WeightLayout, importance: Tensor, config: VQConfig) -> None:
        self.layout, self.importance, self.config = layout, importance, config
        self.books = _Books.of(layout)
        self.d = layout.scheme.weights_per_code
        self.K = 2**layout.scheme.bits
        out, n = layout.shape
        self.codebook = importance.new_zeros(layout.n_codebooks, self.K, self.d)
        self.codes = torch.zeros(out, n // self.d, dtype=torch.int64, device=importance.device)
        self.q: Tensor | None = None  # the current vector's values [out, d]

    def __call__(self, j: int, w: Tensor, current: Callable[[Tensor | slice], Tensor]) -> Tensor:
        offset = j % self.d
        if offset == 0:
            g, start = divmod(j, self.books.width)
            if start == 0:
                self._learn(g, current(slice(j, j + self.books.width)))
            books = self.codebook[self.books.index(g, w.shape[0], w.device)] if self.books.per_row else self.codebook[g]
            x = current(slice(j, j + self.d))
            self.codes[:, j // self.d], self.q = self._nearest(x, books, self.importance[j:j + self.d])
        return self.q[:, offset]

    def _learn(self, g: int, cur: Tensor) -> None:
        """k-means codebook(s) of column group ``g`` from its current weights ``cur [out, width]``."""
        out, width = cur.shape
        x = cur.reshape(out, width // self.d, self.d)
        w = self.importance[g * width:(g + 1) * width].reshape(1, width // self.d, self.d)
        if not self.books.per_row:
            x, w = x.reshape(1, -1, self.d), w.expand(out, -1, -1).reshape(1, -1, self.d)
        generator = torch.Generator().manual_seed(self.config.seed + g)  # on the CPU: the same draws on every device
        samples = max(self.config.kmeans_samples, self.K)
        if x.shape[1] > samples:
            keep = torch.randperm(x.shape[1], generator=generator)[:samples].to(x.device)
            x, w = x[:, keep], w.expand_as(x)[:, keep]
        c, _ = weighted_kmeans(x, w, self.K, iterations=self.config.kmeans_iterations,
                               seed=int(torch.randint(2**31, (1,), generator=generator)))
        self.codebook[self.books.index(g, out, x.device).unique()] = c.half().float()  # the values stored

    @staticmethod
    def _nearest(x: Tensor, books: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
        """Each row's nearest vector of ``x [out, d]`` in its codebook (``books [out, K, d]``, or one
        ``[K, d]`` all rows share) under the coordinate weights ``w [d]``: ``(codes [out], values [out, d])``."""
        if books.dim() == 2:
            codes = ((w * books * books).sum(-1) - 2 * (w * x) @ books.T).argmin(-1)
            return codes, books[codes]
        codes = ((w * books * books).sum(-1) - 2 * torch.einsum("rd,rkd->rk", w * x, books)).argmin(-1)
        return codes, books[torch.arange(x.shape[0], device=x.device), codes]

    def flat_index(self) -> Tensor:
        """``[out, n / d]``: each vector's row in the codebook flattened to ``[n_codebooks * K, d]``."""
        out, m = self.codes.shape
        per_group = m // self.books.G
        book = torch.stack([self.books.index(g, out, self.codes.device) for g in range(self.books.G)], 1)
        return book.repeat_interleave(per_group, 1) * self.K + self.codes


def refine_codebook(W: Tensor, H: Tensor, codebook: Tensor, index: Tensor, iterations: int) -> Tensor:
    """Codebook values that lower ``tr((W - Q) H (W - Q)^T)`` with ``Q`` the gather of ``index``.

    The error is quadratic in the codebook ``C``: ``Q = A(C)`` is linear (a gather), so its minimum
    solves ``A^T(A(C) H) = A^T(W H)``, symmetric positive semi-definite; ``iterations`` steps of
    conjugate gradients with a Jacobi preconditioner start from ``codebook`` (each step lowers the
    error or leaves it; entries no vector uses are kept). Rounded to float16, as stored.

    Args:
        W: float32 target ``[out, n]``; H: ``[n, n]`` symmetric positive definite.
        codebook: float32 ``[B, K, d]``; index: int64 ``[out, n / d]`` rows of ``codebook.reshape(B*K, d)``.
    """
    B, K, d = codebook.shape
    flat = index.reshape(-1)

    def A(C: Tensor) -> Tensor:
        return C.reshape(B * K, d)[flat].reshape(W.shape)

    def At(Y: Tensor) -> Tensor:
        return torch.zeros(B * K, d, dtype=Y.dtype, device=Y.device).index_add_(0, flat, Y.reshape(-1, d))

    C = codebook.reshape(B * K, d).clone()
    diag = At(H.diagonal().expand_as(W))
    precond = torch.where(diag > 0, 1.0 / diag.clamp_min(torch.finfo(diag.dtype).tiny), torch.zeros_like(diag))
    r = At((W - A(C)) @ H)
    z = precond * r
    p = z.clone()
    rz = (r * z).sum()
    for _ in range(iterations):
        if rz <= 0:
            break
        Ap = At(A(p) @ H)
        pAp = (p * Ap).sum()
        if pAp <= 0:
            break
        alpha = rz / pAp
        C += alpha * p
        r -= alpha * Ap
        z = precond * r
        rz, rz_old = (r * z).sum(), rz
        p = z + (rz / rz_old) * p
    return C.reshape(B, K, d).half().float()


def _solve(method: str) -> Callable[..., QuantizedWeight]:
    def quantize_one(weight: Tensor, scheme: QuantScheme, config: VQConfig, statistics: InputStatistics,
                     layer: str) -> QuantizedWeight:
        check_vq_scheme(scheme, method)
        return gptvq_quantize(weight, statistics["hessian"], scheme, config, layer=layer)

    quantize_one.__doc__ = gptvq_quantize.__doc__
    return quantize_one


register_method("vq", config=VQConfig, statistics=[Statistic.HESSIAN],
                summary="vector quantization (GPTVQ): k-means codebooks of vector_dim weights, GPTQ error "
                        "feedback, codebook refinement (Hessian)")(per_weight(_solve("vq")))
register_method("pq", config=VQConfig, statistics=[Statistic.HESSIAN],
                summary="product quantization: vq with one codebook per group of input columns, shared by "
                        "every row (Hessian)")(per_weight(_solve("pq")))


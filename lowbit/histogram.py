"""Streaming ``|x|`` histograms of activations, and the clipping threshold each observer picks from one.

Static activation scales are calibrated on every token of every calibration window, far more
values than fit in memory at once (128 x 512 tokens x 1536 channels is 400 MB per layer input in
float32). The observers therefore run on a histogram accumulated batch by batch, as TensorRT and
pytorch-quantization's ``HistogramCalibrator`` do:

- bins have a fixed width; when a batch exceeds the covered range, bins are appended, and when
  there are more than ``2 * bins`` of them, neighbours are merged in pairs (width doubles), which
  is exact: no count moves to a bin it does not belong to;
- ``minmax`` uses the exact running maximum, ``percentile`` the histogram's quantile (linear within
  a bin), ``mse`` the expected squared quantization error over bin centres for each candidate
  threshold, ``kl`` TensorRT's entropy calibration (``lowbit.observers``' KL over bins).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from lowbit.observers import _kl_best_bins, kl_strided_candidates

DEFAULT_BINS = 2048
MSE_CANDIDATES = 200


class AbsHistogram:
    """Counts of ``|x|`` in bins ``[i * width, (i + 1) * width)``, between ``bins`` and ``2 * bins`` of them."""

    def __init__(self, bins: int = DEFAULT_BINS) -> None:
        if bins < 16:
            raise ValueError(f"a histogram needs at least 16 bins, got {bins}")
        self.bins = bins
        self.counts: Tensor | None = None  # float64 [n]
        self.width = 0.0
        self.amax = 0.0
        self.total = 0

    def update(self, x: Tensor) -> None:
        """Add every value of ``x``; raises on NaN/Inf."""
        a = x.detach().reshape(-1).abs().float()  # a fresh tensor: scaled in place below
        if a.numel() == 0:
            return
        amax = float(a.max())
        if not math.isfinite(amax):
            raise ValueError(f"activations contain NaN/Inf ({int((~torch.isfinite(a)).sum())} values); "
                             "the model overflows on the calibration text (load it in float32)")
        if self.counts is None:
            self.width = amax / self.bins if amax > 0 else 1e-30
            self.counts = torch.zeros(self.bins, dtype=torch.float64)
        self._cover(amax)
        # truncation is floor for a >= 0; int32 indices make the pass ~3x faster than floor + int64
        idx = a.div_(self.width).clamp_(max=self.counts.numel() - 1).to(torch.int32)
        self.counts += torch.bincount(idx, minlength=self.counts.numel()).to(torch.float64)
        self.amax = max(self.amax, amax)
        self.total += idx.numel()

    def _cover(self, amax: float) -> None:
        """Grow the bins until ``amax`` falls inside them (merging pairs beyond ``2 * bins``)."""
        assert self.counts is not None
        need = math.floor(amax / self.width) + 1
        while need > 2 * self.bins:
            if self.counts.numel() % 2:
                self.counts = torch.cat([self.counts, self.counts.new_zeros(1)])
            self.counts = self.counts.view(-1, 2).sum(1)
            self.width *= 2
            need = math.floor(amax / self.width) + 1
        if need > self.counts.numel():
            self.counts = torch.cat([self.counts, self.counts.new_zeros(need - self.counts.numel())])

    def threshold(self, observer: str, *, fake_quant: Callable[[Tensor, float], Tensor], levels: int = 256,
                  percentile: float = 99.99) -> float:
        """The clipping threshold (the magnitude a scale maps to the grid's largest value) that
        ``observer`` chooses.

        Args:
            observer: ``minmax``, ``percentile``, ``mse`` or ``kl``.
            fake_quant: ``(values, threshold) -> quantize-dequantized values`` of the target format;
                used by ``mse``.
            levels: grid points of the target format (256 for int8); ``kl`` merges bins into
                ``levels // 2`` positive levels.
            percentile: the ``|x|`` quantile ``percentile`` keeps (``percentile`` observer).
        """
        if self.counts is None or self.total == 0:
            raise ValueError("no activations were recorded")
        if self.amax == 0.0:
            return 0.0
        if observer == "minmax":
            return self.amax
        used = int(torch.nonzero(self.counts).max()) + 1  # bins past the max hold nothing
        counts = self.counts[:used]
        if observer == "percentile":
            return min(self._quantile(counts, percentile / 100.0), self.amax)
        if observer == "mse":
            return self._mse(counts, fake_quant)
        if observer == "kl":
            nq = levels // 2
            if used <= nq:
                return self.amax
            cand = kl_strided_candidates(used, nq, counts.device).reshape(1, -1)
            i_best = int(_kl_best_bins(counts.reshape(1, -1), cand, nq)[0])
            return min((i_best + 0.5) * self.width, self.amax)
        raise ValueError(f"unknown activation observer {observer!r}; valid: minmax, percentile, mse, kl")

    def quantile(self, q: float) -> float:
        """The ``q``-quantile (``0 <= q <= 1``) of the recorded ``|x|``, linear within a bin."""
        if self.counts is None or self.total == 0:
            raise ValueError("no activations were recorded")
        return min(self._quantile(self.counts, q), self.amax)

    def _quantile(self, counts: Tensor, q: float) -> float:
        cdf = counts.cumsum(0)
        target = q * float(cdf[-1])
        i = int(torch.searchsorted(cdf, torch.tensor([target], dtype=torch.float64))[0])
        i = min(i, counts.numel() - 1)
        before = float(cdf[i - 1]) if i > 0 else 0.0
        inside = float(counts[i])
        frac = (target - before) / inside if inside > 0 else 1.0
        return (i + frac) * self.width

    def _mse(self, counts: Tensor, fake_quant: Callable[[Tensor, float], Tensor]) -> float:
        """Threshold in ``(amax / 200, amax]`` minimising the count-weighted squared error of the bin
        centres (ties keep the larger threshold, so the result is never worse than minmax on the
        histogram)."""
        centres = (torch.arange(counts.numel(), dtype=torch.float64) + 0.5).mul_(self.width).clamp_(max=self.amax)
        centres = centres.float()
        best, best_err = self.amax, math.inf
        for k in range(MSE_CANDIDATES, 0, -1):
            t = self.amax * k / MSE_CANDIDATES
            err = float((counts * (centres - fake_quant(centres, t)).double().pow(2)).sum())
            if err < best_err * (1 - 1e-12):
                best, best_err = t, err
        return best

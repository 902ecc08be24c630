"""Per-linear input statistics from calibration text, for choosing GGUF block parameters.

``importance`` is llama.cpp's imatrix: the mean of x_j^2 over every calibration token, per input
column j of each linear layer. ``hessians`` adds GPTQ's ``H = 2 X^T X / n`` per layer, which
``gptq_blocks.gptq_quantize_rows`` uses for error feedback. Both come from one pass of the float
model over the windows (as ``llama-imatrix`` does), so they do not depend on the target type.

Linears that read the very same input tensor (q/k/v projections, gate/up) have the same
statistics, so each input is accumulated once and the result shared by name: on SmolLM2 this
turns seven ``[in, in]`` products per block into four.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lowbit.methods.gptq import accumulate_hessian


@dataclass
class InputStats:
    """Statistics of the linear layers' inputs, by layer name.

    Fields:
        importance: float32 ``[in_features]`` mean of x^2 per input column.
        hessians: float32 ``[in_features, in_features]`` ``2 X^T X / n``; empty unless requested.
        tokens: calibration tokens seen (every position of every window).
    """

    importance: dict[str, np.ndarray] = field(default_factory=dict)
    hessians: dict[str, Tensor] = field(default_factory=dict)
    tokens: int = 0


@torch.no_grad()
def collect_input_stats(model: nn.Module, windows: Tensor, *, hessians: bool = False,
                        progress: bool = True) -> InputStats:
    """Run ``model`` over ``windows [n, L]`` (one at a time) and collect every ``nn.Linear``'s input stats.

    Raises:
        ValueError: no windows, or an input that is not finite (naming the layer).
    """
    if windows.ndim != 2 or len(windows) == 0:
        raise ValueError(f"calibration needs at least one window of token ids [n, L], got shape {tuple(windows.shape)}")
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}
    hess: dict[str, Tensor] = {}
    shares: dict[str, str] = {}  # layer -> the earlier layer that read the same input tensor
    previous: list = [None, None]  # (input tensor, layer name) of the latest call in this forward

    def hook(name: str):
        def record(module: nn.Module, args: tuple) -> None:
            if args[0] is previous[0]:
                owner = shares.setdefault(name, previous[1])
                if owner != previous[1]:
                    raise RuntimeError(f"{name} shared its input with {owner} on one window and with "
                                       f"{previous[1]} on another; the model's data flow changes between calls")
                return
            if name in shares:
                raise RuntimeError(f"{name} shared its input with {shares[name]} on one window only")
            previous[:] = [args[0], name]
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            if not torch.isfinite(x).all():
                raise ValueError(f"the input of {name} is not finite on the calibration text; "
                                 "the model's float weights are broken")
            sums[name] = sums[name] + (x * x).sum(dim=0) if name in sums else (x * x).sum(dim=0)
            if hessians:
                hess[name], _ = accumulate_hessian(hess.get(name), x, counts.get(name, 0))
            counts[name] = counts.get(name, 0) + x.shape[0]
        return record

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in linears.items()]
    was_training = model.training
    try:
        model.eval()
        for window in tqdm(windows, desc="calibration statistics", unit="win", disable=not progress):
            model(window.reshape(1, -1))
            previous[:] = [None, None]
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    importance = {name: (s / counts[name]).numpy().astype(np.float32) for name, s in sums.items()}
    for name, owner in shares.items():
        importance[name] = importance[owner]
        if hessians:
            hess[name] = hess[owner]
    return InputStats(importance=importance, hessians=hess, tokens=int(windows.numel()))

"""Diagonal Fisher information of linear weights: the mean squared gradient of the calibration loss.

SqueezeLLM (Kim et al. 2023) weighs each weight's rounding error by how much the loss reacts to it;
to second order that is the diagonal of the Fisher information, estimated per calibration window
as the square of the gradient of that window's next-token cross-entropy (the float model's own
loss on the calibration text), averaged over windows: ``F = mean_windows (dL/dW)^2``.

Memory is bounded: one window at a time (batch 1), gradients only for the selected linears'
weights (every other parameter is frozen for the pass), and each weight's gradient folded into its
float32 accumulator and dropped as soon as autograd has produced it
(``register_post_accumulate_grad_hook``), so at most one linear's gradient exists beside the
accumulators (as large as the selected weights in float32) and one window's activations.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm


@dataclass
class FisherResult:
    """``fisher``: per full module name, float32 ``[out, in]`` mean squared gradients (the weight's
    own layout: GPT-2's ``Conv1D`` stores ``[in, out]`` and gets ``[out, in]`` here too);
    ``windows``: how many calibration windows they average; ``seconds``: wall time of the passes."""

    fisher: dict[str, Tensor]
    windows: int
    seconds: float


def collect_fisher(model: nn.Module, calib: Tensor, linears: Iterable[str], *, progress: bool = True) -> FisherResult:
    """Diagonal Fisher of the weights of ``linears`` (full module names) on the windows ``calib``.

    Args:
        model: a causal LM whose forward takes ``input_ids`` and ``labels`` (Hugging Face).
        calib: int64 token ids ``[windows, seqlen]``; each window's loss is its mean next-token
            cross-entropy under ``model`` as it is (float, unquantized).
        linears: the modules whose ``weight`` gets a Fisher; every other parameter's gradient is
            not computed.

    The model's parameters keep their ``requires_grad`` flags and training mode afterwards; no
    ``.grad`` is left behind. Deterministic for the same model and windows.

    Raises:
        ValueError: ``calib`` is not int64 ``[windows, seqlen]`` with ``seqlen >= 2``, no linear is
            named, or a window's loss is not finite.
    """
    from transformers.pytorch_utils import Conv1D

    if not isinstance(calib, Tensor) or calib.dim() != 2 or calib.dtype != torch.long or calib.shape[1] < 2:
        what = f"{calib.dtype} {tuple(calib.shape)}" if isinstance(calib, Tensor) else type(calib).__name__
        raise ValueError(f"the Fisher needs int64 token ids [windows, seqlen >= 2], got {what}")
    names = list(linears)
    if not names:
        raise ValueError("the Fisher was asked for no linear layer")
    modules = {name: model.get_submodule(name) for name in names}
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    accumulators: dict[str, Tensor] = {}
    handles = []

    def fold(acc: Tensor):
        def hook(param: Tensor) -> None:
            acc.addcmul_(param.grad, param.grad)
            param.grad = None

        return hook

    start = time.perf_counter()
    try:
        model.eval()
        for p in flags:
            p.requires_grad_(False)
        for name, module in modules.items():
            weight = module.weight
            acc = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            accumulators[name] = acc
            weight.requires_grad_(True)
            handles.append(weight.register_post_accumulate_grad_hook(fold(acc)))
        with torch.enable_grad():
            for i in tqdm(range(calib.shape[0]), desc="fisher", unit="window", disable=not progress):
                ids = calib[i:i + 1]
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                if not torch.isfinite(loss):
                    raise ValueError(f"the calibration loss of window {i} is {loss.item()}; the float model "
                                     "overflows on it (load it in float32)")
                loss.backward()
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in flags.items():
            p.grad = None
            p.requires_grad_(flag)
        model.train(was_training)
    n = calib.shape[0]
    fisher = {}
    for name, acc in accumulators.items():
        acc.div_(n)
        fisher[name] = acc.T.contiguous() if isinstance(modules[name], Conv1D) else acc
    return FisherResult(fisher, n, time.perf_counter() - start)

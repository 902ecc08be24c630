"""How much memory one block of a streamed calibrated job needs, and the limit it runs under.

A job streamed with a ``BlockStore`` holds one block's float weights, the statistics of its widest input (a Hessian is
``in^2`` float32) with the solver's two buffers of that size and copies of that linear's weight, one batch's intermediates, and the quantized codes
being built; its ``[samples, seqlen, hidden]`` activations are in files whose pages the kernel
writes back and drops under a limit, so they are not counted. When the process runs under a memory limit (a cgroup, v1 or v2) that is smaller than
this, it would be killed hours in; ``check_block_fits`` says so at the start, in one line.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

_OVERHEAD = 500 << 20  # Python, torch, transformers and a tokenizer (a streamed SmolLM2 job peaked at 624 MiB)


def block_bytes(block: nn.Module, *, seqlen: int, hidden: int, batch_size: int, hessian: bool) -> dict[str, int]:
    """The parts of one block's working set, in bytes (the meta device is fine: only shapes are read):
    what stays all along (weights, overhead), plus the larger of the forward pass (a
    batch's intermediates while the statistics fill) and the solve (the solver's buffers for the
    linear that needs the most: the widest input's, in practice)."""
    weights = sum(p.numel() * p.element_size() for p in block.parameters())
    linears = [m for m in block.modules() if isinstance(getattr(m, "in_features", None), int)]
    widest = max((m.in_features for m in linears), default=hidden)
    intermediate = max((m.out_features for m in block.modules() if isinstance(getattr(m, "out_features", None), int)),
                       default=hidden)
    # q/k/v, o and gate/up read three hidden-wide inputs, down_proj the widest
    statistics = (widest * widest + 3 * hidden * hidden) * 4 if hessian else 8 * widest * 4
    forward = 4 * batch_size * seqlen * max(intermediate, hidden) * 4
    # GPTQ's solve of a linear holds two more [in, in] buffers beside the collected Hessian (its permuted,
    # damped copy factorized in place, then cholesky_inverse's result: lowbit.methods.gptq.inverse_hessian_factor)
    # and about four float32 copies of its [out, in] weight (stacked, permuted, the rounded columns, the
    # codes); with seven Hessian copies a Qwen2.5-1.5B job under a 2 GiB limit was killed in block 0's
    # 8960-wide down_proj solve, with these the same solve peaked at about 1.8 GiB resident
    solve = max((2 * m.in_features ** 2 + 4 * m.in_features * m.out_features) * 4 for m in linears) \
        if hessian and linears else 0
    return {"float weights": weights, "statistics": statistics, "forward or solve": max(forward, solve), "overhead": _OVERHEAD}


def memory_limit() -> int | None:
    """This process's cgroup memory limit in bytes, or None when there is none (or it cannot be read)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        candidates = []
        if "memory" in controllers.split(","):
            candidates.append(Path("/sys/fs/cgroup/memory") / path.lstrip("/") / "memory.limit_in_bytes")
        elif controllers == "":
            candidates.append(Path("/sys/fs/cgroup") / path.lstrip("/") / "memory.max")
        for candidate in candidates:
            try:
                text = candidate.read_text().strip()
            except OSError:
                continue
            if text != "max" and int(text) < 1 << 60:
                return int(text)
    return None


def check_block_fits(parts: dict[str, int], limit: int | None) -> None:
    """Refuse a job whose one block needs more than ``limit`` bytes.

    Raises:
        ValueError: one line: the limit, what one block needs and of what.
    """
    need = sum(parts.values())
    if limit is None or need <= limit:
        return
    detail = ", ".join(f"{k} {v / 2**20:.0f}" for k, v in parts.items())
    raise ValueError(f"the memory limit of {limit / 2**20:.0f} MiB is below what one block needs: {need / 2**20:.0f} "
                     f"MiB ({detail} MiB); raise the limit")

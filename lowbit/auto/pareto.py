"""The Pareto report: quantize at a row of budgets, evaluate each, tabulate and plot quality against size.

``run_pareto`` measures the sensitivities once (one calibration pass), then per budget allocates,
quantizes a fresh copy of the model with the allocated recipe, and scores it against the float model
on held-out windows (perplexity, KL, top-1). ``write_report`` writes a Markdown table and a PNG
with KL and perplexity against bits per weight and against stored size, with other tools' or
uniform schemes' rows (``peer_rows``: any benchmark results JSON of ``bench/``) beside lowbit's.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lowbit.auto.allocate import allocate, block_linears
from lowbit.auto.budget import Budget
from lowbit.auto.candidates import LOWBIT_CANDIDATES
from lowbit.auto.sensitivity import measure_sensitivity


@dataclass
class ParetoRow:
    """One point: ``label`` (budget or peer), where it comes from (``tool``), exact bits per weight of
    the quantized linears, stored bytes of the whole model, and its scores."""

    label: str
    tool: str
    bpw: float
    size_bytes: int | None
    ppl: float
    kld: float | None
    top1: float | None
    seconds: float = 0.0
    allocation: dict[str, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_pareto(load_model: Callable[[], torch.nn.Module], reference: torch.nn.Module, calibration: torch.Tensor,
               windows: torch.Tensor, budgets: Sequence[float], *, bos_id: int | None, method: str = "rtn",
               progress: bool = True) -> list[ParetoRow]:
    """One ``ParetoRow`` per bits-per-weight budget (block linears, as the README tables count).

    ``load_model()`` returns a fresh float model each call (quantization is in place); ``reference``
    is the float model the KL is measured against, and the one whose Hessians the proxy reads.
    Raises ``ValueError`` for a budget outside the candidates' range (saying it) before any work.
    """
    from lowbit.api import needs_calibration, quantize
    from lowbit.evaluate.perplexity import evaluate_models
    from lowbit.evaluate.size import size_report, stored_bytes

    names = block_linears(reference)
    start = time.perf_counter()
    table = measure_sensitivity(reference, calibration, lambda n: LOWBIT_CANDIDATES, names, method=method,
                                progress=progress)
    proxy_seconds = time.perf_counter() - start
    allocations = [allocate(reference, None, Budget(bpw=b), method=method, table=table, progress=False)
                   for b in budgets]  # every budget checked before the slow part
    rows = []
    for b, allocation in zip(budgets, allocations):
        model = load_model()
        start = time.perf_counter()
        recipe = allocation.recipe
        quantize(model, recipe, calibration=calibration if needs_calibration(recipe) else None, progress=progress)
        seconds = time.perf_counter() - start
        result = evaluate_models([model], windows, bos_id=bos_id, reference=reference, progress=progress)[0]
        rows.append(ParetoRow(f"{b:g} bpw", f"lowbit auto ({method})", size_report(model).bpw, stored_bytes(model),
                              result.ppl, result.kld, result.top1, proxy_seconds + allocation.seconds + seconds,
                              allocation.counts()))
        del model
    return rows


def peer_rows(path: str | Path) -> list[ParetoRow]:
    """Rows of a ``bench/results/*.json`` file (``rows`` with ``bpw``, ``ppl``, ``kld``; ``setting``,
    ``method``, ``tool`` name them), for the plot. Rows without a number of bits are left out.

    Raises:
        ValueError: a file that is not such JSON.
    """
    try:
        data = json.loads(Path(path).read_text())
        rows = data["rows"] if isinstance(data, dict) else data
        out = []
        for r in rows:
            if not isinstance(r.get("bpw"), (int, float)) or r.get("ppl") is None or r.get("bpw", 0) >= 16:
                continue
            label = " ".join(str(r[k]) for k in ("setting", "method", "label") if r.get(k) not in (None, "-"))
            tool = f"{r.get('tool', 'lowbit')} ({Path(path).stem})"
            out.append(ParetoRow(label or "row", tool, float(r["bpw"]), r.get("size_bytes") or r.get("bytes"),
                                 float(r["ppl"]), r.get("kld"), r.get("top1")))
        return out
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"--peers {path}: not a bench results JSON with rows of bpw, ppl and kld ({e})") from None


def markdown(rows: Sequence[ParetoRow], title: str) -> list[str]:
    lines = [f"# {title}", "", "| point | tool | bits/weight | size MiB | ppl | KL | top-1 | seconds | schemes |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in sorted(rows, key=lambda r: (r.tool, r.bpw)):
        size = f"{r.size_bytes / 2**20:.2f}" if r.size_bytes else "-"
        kld = f"{r.kld:.4f}" if r.kld is not None else "-"
        top1 = f"{r.top1:.3f}" if r.top1 is not None else "-"
        schemes = ", ".join(f"{n} x{k}" for n, k in (r.allocation or {}).items())
        lines.append(f"| {r.label} | {r.tool} | {r.bpw:.3f} | {size} | {r.ppl:.3f} | {kld} | {top1} | "
                     f"{r.seconds:.1f} | {schemes} |")
    return lines


def plot(rows: Sequence[ParetoRow], path: Path, title: str) -> None:
    """A 2 x 2 PNG: KL and perplexity against bits per weight (top) and stored MiB (bottom), one
    series per tool; a log scale for KL and perplexity, which span orders of magnitude at low bits."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    tools = sorted({r.tool for r in rows})
    for (i, x), (j, y) in [((i, x), (j, y)) for i, x in enumerate(("bpw", "size")) for j, y in enumerate(("kld", "ppl"))]:
        ax = axes[i][j]
        for tool in tools:
            points = sorted((r.bpw if x == "bpw" else (r.size_bytes or 0) / 2**20, getattr(r, y))
                            for r in rows if r.tool == tool and getattr(r, y) is not None
                            and (x == "bpw" or r.size_bytes))
            if points:
                style = "-o" if tool.startswith("lowbit auto") else "s"
                ax.plot(*zip(*points), style, label=tool, markersize=5)
        ax.set_xlabel("bits per weight (quantized linears)" if x == "bpw" else "stored size (MiB)")
        ax.set_ylabel({"kld": "KL(float || quantized)", "ppl": "perplexity"}[y])
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(rows: Sequence[ParetoRow], out_dir: str | Path, title: str) -> tuple[Path, Path]:
    """``pareto.md``, ``pareto.json`` and ``pareto.png`` in ``out_dir`` (created); returns (md, png)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md, png = out_dir / "pareto.md", out_dir / "pareto.png"
    (out_dir / "pareto.json").write_text(json.dumps({"title": title, "rows": [r.to_dict() for r in rows]},
                                                    indent=2) + "\n")
    md.write_text("\n".join(markdown(rows, title)) + "\n")
    plot(rows, png, title)
    return md, png

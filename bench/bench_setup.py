"""What the model benchmarks share: the float reference, the BOS rule, the calibration and evaluation
token windows, and the run's metadata. Imported from the scripts' own directory (``sys.path[0]``)."""

from __future__ import annotations

import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
SEQLEN = 512


@dataclass
class BenchSetup:
    """``work``: ``out/bench/<model>/``; ``calib_path``: the calibration ids every tool reads
    (128 x 512 cleaned WikiText-2 valid, seed 0, by default), written once and reused."""

    name: str
    work: Path
    reference: torch.nn.Module
    tokenizer: Any
    bos_id: int | None
    calib_path: Path
    windows: torch.Tensor
    meta: dict[str, Any]


def bench_setup(script: str, model: str, calib_samples: int, n_windows: int) -> BenchSetup:
    """Load ``model`` as the float reference, make (or reuse) its calibration windows, take the first
    ``n_windows`` windows of WikiText-2 raw test, and describe the run (``script`` names the command)."""
    from safetensors.torch import save_file

    from lowbit.api import load
    from lowbit.evaluate.text import default_eval_path, read_text, token_windows
    from lowbit.pipeline.calibration import calibration_windows
    from lowbit.sources import needs_bos

    name = Path(model).name
    work = ROOT / "out" / "bench" / name
    work.mkdir(parents=True, exist_ok=True)
    reference, tokenizer = load(model)
    bos_id = tokenizer.bos_token_id if needs_bos(tokenizer) else None
    calib_path = work / f"calib-{calib_samples}x{SEQLEN}.safetensors"
    if not calib_path.is_file():
        ids = calibration_windows(tokenizer, samples=calib_samples, seqlen=SEQLEN, seed=0, bos_id=bos_id)
        save_file({"input_ids": ids.contiguous()}, str(calib_path))
    windows = token_windows(read_text(default_eval_path()), tokenizer, SEQLEN, n_windows)
    meta = {"command": " ".join(["python", script, *sys.argv[1:]]), "model": name, "windows": n_windows,
            "seqlen": SEQLEN, "calibration": f"{calib_samples}x{SEQLEN} wikitext-2 valid, seed 0",
            "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor(),
            "date": time.strftime("%Y-%m-%d")}
    return BenchSetup(name, work, reference, tokenizer, bos_id, calib_path, windows, meta)

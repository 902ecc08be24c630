"""What both peer runners share; imported from the script's own directory (no lowbit import)."""

import argparse
import importlib.util
import json
import resource
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "vocab.json", "merges.txt")


def parse_args(description: str, argv=None) -> argparse.Namespace:
    """The options both runners take, with lowbit's names and defaults."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--model", required=True, help="float32 Hugging Face model directory")
    ap.add_argument("--calib", required=True, help="safetensors file with int64 input_ids [samples, seqlen]")
    ap.add_argument("--bits", type=int, choices=(2, 3, 4, 8), default=4)
    ap.add_argument("--group-size", type=int, default=64, help="group length, or -1 for per-channel")
    ap.add_argument("--sym", dest="sym", action="store_true", default=True, help="symmetric grid (default)")
    ap.add_argument("--asym", dest="sym", action="store_false", help="asymmetric grid, integer zero point")
    ap.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=False)
    ap.add_argument("--damp", type=float, default=0.01, help="fraction of mean diag(H) added to the diagonal")
    ap.add_argument("--out", required=True, help="output directory (float32 HF model + peer.json)")
    args = ap.parse_args(argv)
    if args.group_size == 0 or args.group_size < -1:
        ap.error("--group-size must be > 0 or -1 (per-channel)")
    return args


def copy_tokenizer(model_dir: str, out: Path) -> None:
    """Copy the source model's tokenizer files next to the written float model."""
    for f in TOKENIZER_FILES:
        if (Path(model_dir) / f).is_file():
            shutil.copy2(Path(model_dir) / f, out / f)


def write_report(out: Path, report: dict) -> None:
    """``peer.json`` in ``out``, and a one-line summary plus the notes on stdout."""
    (out / "peer.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(json.dumps({k: report[k] for k in ("tool", "version", "quantize_seconds", "peak_rss_bytes")}))
    for n in report["notes"]:
        print("note:", n)


def proc_status() -> dict[str, int]:
    """This process's ``VmRSS``, ``RssAnon``, ``RssFile`` and ``VmHWM`` in bytes (Linux ``/proc``;
    empty elsewhere). Shared with bench/load_4bit.py and bench/qlora.py, which import it by path."""
    fields = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                    fields[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return fields


def peak_rss_bytes() -> int:
    """VmHWM of this process. Not ru_maxrss: Linux carries the parent's high-water mark across
    fork/exec into ru_maxrss, so a child of a large process would report the parent's peak."""
    hwm = proc_status().get("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB


def parse_w8a8_args(description: str, argv=None, *, static_option: bool = False) -> argparse.Namespace:
    """The options of both W8A8 runners (called by bench/activations.py's run_peers); ``--static`` only
    where the tool has both kinds of activation scales (llm-compressor; quanto's are always static)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--model", required=True, help="float32 Hugging Face model directory")
    ap.add_argument("--calib", required=True, help="safetensors file with int64 input_ids [samples, seqlen]")
    ap.add_argument("--windows", required=True, help="safetensors file with int64 input_ids [n, seqlen] to score")
    ap.add_argument("--out", required=True, help="result JSON (one table row)")
    ap.add_argument("--bos-id", type=int, default=None, help="BOS id prepended to each evaluation window")
    if static_option:
        ap.add_argument("--static", action="store_true",
                        help="static per-tensor input scales calibrated by the tool, instead of dynamic per-token")
    return ap.parse_args(argv)


def load_perplexity_module():
    """lowbit/evaluate/perplexity.py by path (needs only torch and tqdm), not the lowbit package."""
    path = ROOT / "lowbit" / "evaluate" / "perplexity.py"
    spec = importlib.util.spec_from_file_location("lowbit_eval_perplexity", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolves the module of EvalResult through sys.modules
    spec.loader.exec_module(module)
    return module


def load_ids(path: str):
    import torch
    from safetensors.torch import load_file

    ids = load_file(path)["input_ids"]
    if ids.dtype != torch.int64 or ids.dim() != 2:
        sys.exit(f"{path}: input_ids must be int64 [samples, seqlen], got {ids.dtype} {tuple(ids.shape)}")
    return ids


def capture_loguru_warnings() -> list[str]:
    """A list that collects every loguru WARNING/ERROR/CRITICAL message from now on (llm-compressor
    logs through loguru)."""
    from loguru import logger

    messages: list[str] = []
    logger.add(lambda m: messages.append(m.record["message"]), format="{message}",
               filter=lambda r: r["level"].no >= 30 and r["level"].name in ("WARNING", "ERROR", "CRITICAL"))
    return messages


def llmcompressor_oneshot(model, tokenizer, recipe, ids):
    """llm-compressor's ``oneshot`` with ``recipe`` on exactly the windows ``ids [samples, seqlen]``
    (sequential pipeline, batch size 1, no shuffling, truncation or padding).

    Returns ``(model, seconds, warnings)``: the quantized model, the time of the ``oneshot`` call and
    the Python warnings it raised, as ``"Category: message"``.
    """
    import time
    import warnings

    import torch
    from datasets import Dataset
    from llmcompressor import oneshot

    samples, seqlen = ids.shape
    calib = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        model = oneshot(
            model=model, tokenizer=tokenizer, recipe=recipe, dataset=calib,
            num_calibration_samples=samples, max_seq_length=seqlen, shuffle_calibration_samples=False,
            batch_size=1, pipeline="sequential",
        )
        seconds = time.perf_counter() - t0
    return model, seconds, [f"{w.category.__name__}: {w.message}" for w in caught]


def score_against_float(model, model_dir: str, windows, bos_id: int | None):
    """``(EvalResult dict, reference)``: lowbit's evaluation of ``model`` as the tool leaves it on
    ``windows``, against a fresh float32 load of ``model_dir`` (returned for further checks)."""
    import torch
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    reference.eval()
    result = load_perplexity_module().evaluate_models([model], windows, bos_id=bos_id, reference=reference,
                                                      progress=False)[0].to_dict()
    return result, reference


def write_row(out: str, row: dict) -> None:
    """A W8A8 runner's table row as JSON at ``out``, and a one-line summary plus its notes on stdout."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(row, indent=2, default=str) + "\n")
    print(json.dumps({k: row[k] for k in ("tool", "quantize_seconds", "ppl", "kld", "top1")}))
    for n in row["notes"]:
        print("note:", n)

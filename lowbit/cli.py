"""``lowbit`` command line: argparse -> config -> one library call -> print. Nothing else lives here.

Errors that a user can fix (bad path, bad scheme, existing, unwritable or busy output, corrupt
file, full disk) end the program with one line on stderr and exit status 2, Ctrl-C with one line
and 130; anything else is a bug and keeps its traceback (``lowbit.boundary``, the one place that
decides). A command that writes reserves each output (``lowbit.io.output.reserve_output``:
checked, enough free disk for its estimated size, locked) before its slow work and holds it until
the output is in place.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from lowbit.boundary import OneLineParser, is_user_error, one_line, run_command
from lowbit.cli_numbers import FRACTION, NON_NEGATIVE, POSITIVE, FloatRange
from lowbit.io.export import EXPORTERS, Exporter
from lowbit.io.output import reserve_output
from lowbit.io.output_size import expected_bytes, gguf_bits, parameter_count, stored_bytes

OVERWRITE_HELP = ("replace an existing output that lowbit wrote (a lowbit checkpoint, adapter or .gguf file); "
                  "anything else is never replaced")
NO_VERIFY_HELP = ("read a lowbit checkpoint that differs from its manifest (edited or corrupt) or lacks one: "
                  "skip the integrity check")
ALLOW_PICKLE_HELP = ("read weights from a pickle file (pytorch_model.bin, adapter_model.bin, *.pt) when there is "
                     "no safetensors; unpickling can run code, so only for files you trust")


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``lowbit`` command and return its exit status: 0, ``EXIT_USER`` (2) with one line on
    stderr for a mistake the user can fix (``lowbit.boundary``), 130 for Ctrl-C."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # -h (0) or a usage error (2, one line printed by OneLineParser)
        return int(e.code or 0)
    if not getattr(args, "quiet", False):
        return run_command(lambda: args.run(args), args.command)
    from lowbit.sources import quiet_transformers

    with quiet_transformers(True):  # also the GGUF loader's bar, which ignores transformers' switch
        return run_command(lambda: args.run(args), args.command)


def print_json(value: Any, indent: int | None = None) -> None:
    """Print ``value`` as strict JSON: a non-finite float (a perplexity of NaN or inf) becomes ``null``,
    since ``NaN`` and ``Infinity`` are not JSON and break every parser that reads the output."""
    print(json.dumps(_finite(value), indent=indent, allow_nan=False))


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="lowbit", description="Quantize language models and measure what it cost.")
    sub = p.add_subparsers(dest="command", required=True)
    _add_pull_command(sub)
    _add_quantize_command(sub)
    _add_eval_command(sub)
    _add_export_command(sub)
    _add_finetune_command(sub)
    _add_train_command(sub)
    _add_info_command(sub)
    _add_inference_command(sub)
    _add_pareto_command(sub)
    return p


def _add_pareto_command(sub: argparse._SubParsersAction) -> None:
    """``lowbit pareto``: allocate, quantize and evaluate at several budgets; a table and a plot."""
    from lowbit.pipeline.recipe import method_shorthands

    pa = sub.add_parser("pareto", help="quantize at several bits-per-weight budgets (mixed precision, lowbit.auto), "
                                       "evaluate each, write a Markdown table and a PNG plot")
    pa.add_argument("model", help="HF directory, hub id, .gguf file or demo name (float)")
    pa.add_argument("--budgets", required=True, help="comma-separated bits per weight of the block linears, "
                                                     "e.g. 2.5,3,3.5,4,4.5,5")
    pa.add_argument("-o", "--output", required=True, help="directory for pareto.md, pareto.json and pareto.png")
    pa.add_argument("--method", choices=method_shorthands(), metavar="METHOD", default="rtn",
                    help="the method of the final quantization at each budget (default rtn)")
    pa.add_argument("--windows", type=int, default=16, help="WikiText-2 test windows of 512 scored (default 16)")
    pa.add_argument("--data", help="evaluation text (default: WikiText-2 raw test)")
    pa.add_argument("--peers", action="append", default=[], metavar="JSON",
                    help="a bench results file whose rows (bpw, ppl, KL) join the table and plot (repeatable)")
    pa.add_argument("--quiet", action="store_true", help="no progress bars")
    add_calibration_args(pa, "calibration (the sensitivity proxy, and calibrated methods)")
    pa.set_defaults(run=_run_pareto)


def _add_pull_command(sub: argparse._SubParsersAction) -> None:
    """``lowbit pull``."""
    pull = sub.add_parser("pull", help="fetch a demo model into the cache and print its path")
    pull.add_argument("name", help="smollm2-135m or gemma3-270m")
    pull.add_argument("--quiet", action="store_true", help="no progress bars")
    pull.set_defaults(run=_run_pull)


def _add_quantize_command(sub: argparse._SubParsersAction) -> None:
    """``lowbit quantize`` and its scheme, W8A8 and calibration flags (methods and transforms from their tables)."""
    from lowbit.methods import METHODS, TRANSFORMS
    from lowbit.pipeline.recipe import method_shorthands

    q = sub.add_parser("quantize", help="quantize a model and save a lowbit checkpoint")
    q.add_argument("model", help="HF directory, hub id, .gguf file or demo name")
    q.add_argument("-o", "--output", required=True, help="output directory (must not exist unless --overwrite)")
    q.add_argument("--recipe", help="YAML/JSON recipe file; flags below then override its default scheme")
    q.add_argument("--method", choices=method_shorthands(), metavar="METHOD",
                   help="quantization method (default rtn): " + _table_help(METHODS) + "; TRANSFORM+METHOD "
                        "(e.g. awq+gptq, smoothquant+gptq) runs a channel-scaling transform first; awq alone is "
                        "awq+awq, smoothquant alone smoothquant+rtn")
    q.add_argument("--transform", action="append", choices=list(TRANSFORMS), metavar="TRANSFORM",
                   help="apply a transform before the method (repeatable): " + _table_help(TRANSFORMS))
    q.add_argument("--format", choices=["int", "nf4", "fp4", "fp8_e4m3", "fp8_e5m2", "ternary", "lut"],
                   help="number format (ternary: {-1, 0, 1} times a scale per group, BitNet b1.58's codes, 2 bits; "
                        "lut: a table of 2**bits levels per row, --method squeezellm's and its default)")
    q.add_argument("--bits", type=int, help="bits per code (default: 4, or 8 for fp8, 2 for ternary)")
    gran = q.add_mutually_exclusive_group()
    gran.add_argument("--group-size", type=int, help="weights per scale along the input dimension")
    gran.add_argument("--per-channel", action="store_true", help="one scale per output row")
    gran.add_argument("--per-tensor", action="store_true", help="one scale for the whole matrix")
    sym = q.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="symmetric", action="store_true", default=None, help="no zero-point (default)")
    sym.add_argument("--asym", dest="symmetric", action="store_false", help="scale and zero-point (int only)")
    q.add_argument("--zero-point", choices=["int", "float"],
                   help="asym zero-point on the grid (int) or a float minimum")
    q.add_argument("--observer", choices=["minmax", "percentile", "mse", "kl"])
    q.add_argument("--double-quant", action="store_true", default=None, help="store scales in 8 bits (QLoRA)")
    q.add_argument("--vq-dim", type=int, metavar="D", help="--method vq/pq: weights per code, consecutive along the "
                   "input dimension (2, 4 or 8; default 4)")
    q.add_argument("--codebook-bits", type=int, metavar="K", help="--method vq/pq: bits per code, 2**K vectors per "
                   "codebook (default 8: 2 bits per weight at --vq-dim 4); vq: one codebook per layer, or per "
                   "row (--per-channel) or row group (--group-size); pq: per --group-size input columns (default 64)")
    q.add_argument("--skip", action="append", help="regex of layers kept in float (repeatable; default lm_head)")
    q.add_argument("--group-fallback", choices=["error", "channel", "divisor", "float"],
                   help="layers the group size does not divide: refuse (default), per-channel, the largest "
                        "dividing group size below, or keep in float")
    q.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    q.add_argument("--gguf", metavar="FILE", help="also write a GGUF file of the quantized model (export --to gguf)")
    q.add_argument("--gguf-type", help="its type (default: the GGUF type the scheme is, when it is one: int8 g32 "
                                       "sym Q8_0, int4 g32 sym Q4_0, int4 g32 --asym --zero-point float Q4_1, ...)")
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    q.add_argument("--work-dir", metavar="DIR",
                   help="stream the float model from disk a block at a time and keep finished blocks and the "
                        "activations in DIR (calibrated methods): memory holds one block, the output is sharded, "
                        "and the same command run again resumes an interrupted job; DIR is removed when done")
    budget = q.add_mutually_exclusive_group()
    budget.add_argument("--target-bpw", type=POSITIVE, metavar="X",
                        help="mixed precision: choose each block linear's scheme (lowbit.auto) so they average at "
                             "most X bits per weight, as the README tables count; the LM head as --skip says")
    budget.add_argument("--target-size", metavar="SIZE",
                        help="mixed precision: the whole checkpoint at most SIZE (e.g. 90MiB, 100.57MiB, 94371840), "
                             "the LM head (and the embedding tied to it) among the tensors chosen for")
    add_loading_args(q, verify=False)
    _add_w8a8_args(q)
    cal = add_calibration_args(q, "calibration (gptq, awq, smoothquant, static activations)")
    cal.add_argument("--act-order", action=argparse.BooleanOptionalAction,
                     help="GPTQ: columns by decreasing Hessian diagonal, static groups (default on)")
    cal.add_argument("--damp", type=POSITIVE, help="GPTQ dampening, fraction of mean diag(H) (default 0.01)")
    cal.add_argument("--true-sequential", action="store_true", help="q/k/v before o, gate/up before down")
    cal.add_argument("--holdout", type=int, metavar="K",
                     help="hold out every K-th calibration window (K >= 2): the method and --holdout-candidates "
                          "are fitted on the others, and each linear keeps the one with the smallest output "
                          "error on the held-out windows; the checkpoint's recipe pins each choice")
    cal.add_argument("--holdout-candidates", metavar="LIST",
                     help="what --holdout chooses among besides --method, comma-separated METHOD[:KEY=VALUE...] "
                          "(default rtn; e.g. rtn,gptq:damp=0.1,gptq:damp=1)")
    cal.add_argument("--outlier-fraction", type=FloatRange(0, 0.1), metavar="F",
                     help="SqueezeLLM: share of each weight's entries kept exactly in a sparse part, in [0, 0.1] "
                          "(default 0.0025; each costs 48 bits)")
    cal.add_argument("--fisher-samples", type=int, metavar="N",
                     help="SqueezeLLM: calibration windows its Fisher is computed on (default: all)")
    cal.add_argument("--reduction-slices", type=int, metavar="N",
                     help="sum statistics over N contiguous slices of the windows, folded in order: the output of "
                          "torchrun --nproc-per-node N (the default there) byte for byte, in one process (default 1)")
    add_device_arg(q, "each block's statistics, solves and forward passes (data-free: each weight's solve)")
    q.set_defaults(run=_run_quantize)


def _add_w8a8_args(q: argparse.ArgumentParser) -> None:
    """``quantize``'s activation flags (W8A8)."""
    w8a8 = q.add_argument_group("activations (W8A8)")
    w8a8.add_argument("--weights", choices=["int8", "fp8_e4m3"],
                      help="shortcut for the weight scheme an 8-bit product needs: int8 symmetric or FP8 E4M3, "
                           "per channel (the default when --acts is given)")
    w8a8.add_argument("--acts", choices=["int8", "fp8_e4m3"], help="also quantize the linears' inputs (W8A8)")
    w8a8.add_argument("--act-mode", choices=["dynamic", "static"], default="dynamic",
                      help="scales computed per forward (default) or calibrated once and stored")
    w8a8.add_argument("--act-granularity", choices=["token", "tensor"],
                      help="dynamic scales per token (default) or per tensor; static scales are per tensor")
    w8a8.add_argument("--act-observer", choices=["minmax", "percentile", "mse", "kl"], default="minmax",
                      help="how static scales are calibrated (default minmax)")
    w8a8.add_argument("--act-percentile", type=FloatRange(50, 100, low_open=True), default=99.99,
                      help="|x| quantile kept by --act-observer percentile (default 99.99)")
    w8a8.add_argument("--act-outlier-ratio", type=FloatRange(low=1, low_open=True), metavar="R",
                      help="static scales: a layer whose calibrated range exceeds its median token's largest "
                           "|x| R times (rare huge tokens set it) runs dynamic per-token scales instead; e.g. 8")
    w8a8.add_argument("--rotate", action="store_true",
                      help="same as --transform hadamard: rotate the float model by Hadamard matrices first "
                           "(QuaRot: residual stream, per-head values, online on down_proj inputs); "
                           "Llama/Mistral/Qwen2, no channel-scaling transform")
    w8a8.add_argument("--smoothquant-alpha", type=FRACTION,
                      help="SmoothQuant migration strength in [0, 1] (default 0.5)")


def _add_eval_command(sub: argparse._SubParsersAction) -> None:
    """``lowbit eval``."""
    e = sub.add_parser("eval", help="perplexity (and KL / top-1 against a reference) on held-out text")
    e.add_argument("model", help="lowbit checkpoint, HF directory, hub id, .gguf file or demo name")
    e.add_argument("--data", help="text file (default: WikiText-2 raw test from ../shared/data)")
    e.add_argument("--seqlen", type=int, default=512)
    e.add_argument("--max-windows", type=int, help="evaluate only the first N windows")
    e.add_argument("--reference", help="model to compare with (KL divergence, top-1 agreement)")
    e.add_argument("--bos", choices=["auto", "yes", "no"], default="auto",
                   help="start each window with BOS (auto: when the tokenizer adds one, as Gemma's does)")
    e.add_argument("--runtime", choices=["torch", "llama.cpp"], default="torch",
                   help="how a .gguf model runs: torch (its blocks as lowbit codes, other types dequantized) "
                        "or llama.cpp itself (llama-cpp-python, lowbit[llama-cpp])")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    add_loading_args(e)
    add_device_arg(e, "the model and the reference (--runtime torch)")
    e.set_defaults(run=_run_eval)


def _add_export_command(sub: argparse._SubParsersAction) -> None:
    """``lowbit export`` and its alias ``export-gguf``."""
    x = sub.add_parser("export", help="write a model in another format (--to): "
                       + ", ".join(f"{e.name}, {e.help}" for e in EXPORTERS.values()))
    add_export_args(x, to=None)
    g = sub.add_parser("export-gguf", help="the same as export --to gguf")
    add_export_args(g, to="gguf")


def _add_finetune_command(sub: argparse._SubParsersAction) -> None:
    """``lowbit finetune`` (QLoRA)."""
    f = sub.add_parser("finetune", help="QLoRA: train LoRA adapters (peft format) on a frozen 4-bit base")
    f.add_argument("model", help="HF directory, hub id, .gguf file, demo name or lowbit checkpoint")
    f.add_argument("--data", required=True, help="training text file (its last --holdout share is held out)")
    f.add_argument("-o", "--output", required=True, help="adapter directory (must not exist unless --overwrite)")
    f.add_argument("--quant", choices=["nf4", "fp4", "int4", "none"], default="nf4",
                   help="how the base is loaded (none: float32, plain LoRA); ignored for a lowbit checkpoint")
    f.add_argument("--block-size", type=int, default=64, help="weights per 4-bit scale")
    f.add_argument("--no-double-quant", dest="double_quant", action="store_false",
                   help="keep the 4-bit scales in float16 instead of 8 bits")
    f.add_argument("--compute-dtype", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the base product and the LoRA math (default: float32)")
    f.add_argument("--lora-r", type=int, default=16)
    f.add_argument("--lora-alpha", type=POSITIVE, default=32.0)
    f.add_argument("--lora-dropout", type=FloatRange(0, 1, high_open=True), default=0.05)
    f.add_argument("--target", help="comma-separated linear names to adapt (default: the attention and MLP "
                                    "projections, q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj)")
    f.add_argument("--steps", type=int, default=200)
    f.add_argument("--lr", type=POSITIVE, default=2e-4)
    f.add_argument("--batch-size", type=int, default=4)
    f.add_argument("--seqlen", type=int, default=256)
    f.add_argument("--warmup", type=int, default=10)
    f.add_argument("--holdout", type=FloatRange(0, 1, low_open=True, high_open=True), default=0.1)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    f.add_argument("--eval-windows", type=int, default=8,
                   help="held-out windows scored before and after training (0: skip)")
    f.add_argument("--resume", help="adapter directory to continue training from")
    f.add_argument("--merge", metavar="DIR", help="also write the merged model (re-quantized for a 4-bit base)")
    f.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    f.add_argument("--json", action="store_true", help="print the report as one JSON object")
    f.add_argument("--quiet", action="store_true", help="no progress output")
    add_loading_args(f)
    f.set_defaults(run=_run_finetune)


def _add_train_command(sub: argparse._SubParsersAction) -> None:
    """``lowbit train`` (quantization-aware training)."""
    t = sub.add_parser("train", help="QAT: train a lowbit checkpoint's weights and step sizes against the float "
                                     "model (Block-AP, then end-to-end step sizes on the teacher's KL)")
    t.add_argument("student", help="lowbit checkpoint to start from (any method: rtn, gptq, awq, hqq ...)")
    t.add_argument("--teacher", required=True, help="the float model the checkpoint was quantized from")
    t.add_argument("-o", "--output", required=True, help="trained lowbit checkpoint (must not exist unless --overwrite)")
    t.add_argument("--stage", default="block,e2e", help="comma-separated stages in order: block (Block-AP: block "
                                                       "outputs, weights + step sizes), e2e (E2E-QP: KL to the "
                                                       "teacher, step sizes only); default block,e2e")
    t.add_argument("--data", help="training text file (default: WikiText-2 validation; never the test split)")
    t.add_argument("--seqlen", type=int, default=512)
    t.add_argument("--samples", type=int, default=32, help="training windows of --seqlen tokens")
    t.add_argument("--block-seqlen", type=int, help="Block-AP on the windows cut into sequences this long "
                                                    "(cheaper; must divide --seqlen; default --seqlen)")
    t.add_argument("--heldout", type=int, default=4, help="windows from the text's end, never trained on, for the "
                                                          "logged held-out KL")
    t.add_argument("--batch-size", type=int, default=1, help="E2E-QP windows per step")
    t.add_argument("--block-batch-size", type=int, default=4, help="Block-AP sequences per step")
    t.add_argument("--block-epochs", type=int, default=2, help="Block-AP passes over the windows, per block")
    t.add_argument("--block-lr", type=POSITIVE, default=5e-3,
                   help="Block-AP step sizes (learned in log space: a relative rate) and zero-points")
    t.add_argument("--weight-lr", type=NON_NEGATIVE, default=2e-5, help="Block-AP weights (0: frozen)")
    t.add_argument("--steps", type=int, default=50, help="E2E-QP steps")
    t.add_argument("--lr", type=POSITIVE, default=2e-3, help="E2E-QP step sizes (log space: a relative rate)")
    t.add_argument("--e2e-weight-lr", type=NON_NEGATIVE, default=0.0,
                   help="weights in the e2e stage (0: codes frozen, step sizes only; > 0: full QAT, weights and "
                        "zero-points learn too)")
    t.add_argument("--topk", type=int, default=64, help="teacher log-probabilities kept per position (cached once)")
    t.add_argument("--log-every", type=int, default=10)
    t.add_argument("--eval-every", type=int, default=25, help="held-out KL every this many E2E steps")
    t.add_argument("--save-every", type=int, default=10, help="training state saved every this many E2E steps "
                                                              "(and after every block)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--state-dir", help="resumable training state and cached teacher logits "
                                       "(default: OUTPUT.qat-state)")
    t.add_argument("--resume", action="store_true", help="continue from the state in --state-dir")
    t.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    t.add_argument("--compute-dtype", choices=["float32", "bfloat16"], default="float32",
                   help="the student's forward and backward: bfloat16 runs them under autocast (about 1.4x faster "
                        "steps on a CPU with AVX512-BF16, AMX or Arm BF16; about 10x slower without them, and lowbit warns; "
                        "weights, step sizes, optimizer and loss stay float32)")
    t.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    t.add_argument("--json", action="store_true", help="print the report as one JSON object")
    t.add_argument("--quiet", action="store_true", help="no progress output")
    add_loading_args(t)
    t.set_defaults(run=_run_train)


def _add_info_command(sub: argparse._SubParsersAction) -> None:
    """``lowbit info``."""
    i = sub.add_parser("info", help="per-layer schemes, exact bits per weight and size of a lowbit checkpoint")
    i.add_argument("checkpoint")
    i.add_argument("--json", action="store_true")
    i.add_argument("--quiet", action="store_true", help="no progress bars")
    add_loading_args(i, pickle=False)
    i.set_defaults(run=_run_info)


def _add_inference_command(sub: argparse._SubParsersAction) -> None:
    """``lowbit generate`` and ``lowbit bench-speed``."""
    gen = sub.add_parser("generate", help="continue a prompt, streaming the text (chat template when the model has one)")
    gen.add_argument("model", help="lowbit checkpoint, HF directory, hub id, .gguf file or demo name")
    gen.add_argument("--prompt", required=True, help="the prompt (a user message when the model has a chat template)")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=NON_NEGATIVE, default=0.0, help="0: greedy (default); > 0: sampled")
    gen.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    gen.add_argument("--no-chat", dest="chat", action="store_false", help="use the prompt as plain text")
    gen.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    add_decode_args(gen)
    gen.add_argument("--quiet", action="store_true", help="no progress bars")
    add_loading_args(gen)
    gen.set_defaults(run=_run_generate)
    bs = sub.add_parser("bench-speed", help="prefill and decode tokens/s, threads and peak memory of a model")
    bs.add_argument("model", help="lowbit checkpoint, HF directory, hub id, .gguf file or demo name")
    bs.add_argument("--prompt-tokens", type=int, default=128)
    bs.add_argument("--new-tokens", type=int, default=64)
    bs.add_argument("--repeats", type=int, default=3, help="timed runs; the fastest is reported")
    bs.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    add_decode_args(bs)
    bs.add_argument("--json", action="store_true")
    bs.add_argument("--quiet", action="store_true", help="no progress bars")
    add_loading_args(bs)
    bs.set_defaults(run=_run_bench_speed)


def add_decode_args(parser: argparse.ArgumentParser) -> None:
    """How generation runs: the decode loop and the activation precision of the quantized products."""
    parser.add_argument("--loop", choices=("auto", "lean", "transformers"), default="auto",
                        help="decode loop: lowbit's lean loop (Llama-family float32 models), transformers' "
                             "forward, or auto (lean where it applies; default)")
    parser.add_argument("--activations", choices=("auto", "float32", "int8", "int16"), default="auto",
                        help="x in the decode products: float32 (exact), int16 (16-bit fixed point per token, "
                             "KL ~2e-6), int8 (per block of 64, KL ~0.007, fastest), or auto (int16 where the "
                             "CPU has AVX-512 VNNI, else float32; default)")


def add_export_args(parser: argparse.ArgumentParser, to: str | None) -> None:
    """``export``'s arguments: ``--to`` (unless fixed to ``to``), the output, each exporter's own options
    (from its table entry) and calibration for the options that need statistics."""
    parser.add_argument("model", help="HF directory, hub id, .gguf file, demo name or lowbit checkpoint")
    if to is None:
        parser.add_argument("--to", required=True, choices=list(EXPORTERS), help="the output format")
    else:
        parser.set_defaults(to=to)
    parser.add_argument("-o", "--output", help="the file or directory to write (the format says which)")
    parser.add_argument("--check", action="store_true",
                        help="write nothing: print whether each quantized layer of a lowbit checkpoint maps "
                             "losslessly onto the format, and why not")
    declared: dict[str, str] = {}
    for exporter in EXPORTERS.values() if to is None else [EXPORTERS[to]]:
        group = parser.add_argument_group(f"--to {exporter.name}") if to is None else parser
        for option in exporter.options:
            if option.name in declared:
                raise ValueError(f"exporters {declared[option.name]} and {exporter.name} both declare --{option.name}")
            declared[option.name] = exporter.name
            flag = "--" + option.name.replace("_", "-")
            if option.switch:
                group.add_argument(flag, dest=option.name, action="store_true", default=None, help=option.help)
            else:
                group.add_argument(flag, dest=option.name, help=option.help)
    parser.set_defaults(export_options=declared)
    if to in (None, "gguf"):
        parser.add_argument("--target-size", metavar="SIZE|MIX",
                            help="gguf: choose each tensor's type (lowbit.auto) so the file is at most SIZE (90MiB) "
                                 "or the size of the named mix (Q3_K_M, Q4_K_M: the same file lowbit writes for it)")
        parser.add_argument("--target-types", metavar="LIST",
                            help="gguf, with --target-size: the tensor types to choose among, comma-separated "
                                 "(default Q2_K,Q3_K,Q4_0,Q5_0,Q6_K,Q8_0: Q4_K/Q5_K left out because they re-hit "
                                 "the demo models' source grids; add them for a model with true float weights)")
    add_calibration_args(parser, "calibration (options that need statistics, such as --imatrix and --gptq)")
    add_device_arg(parser, "--imatrix/--gptq's calibration statistics (GGUF's block solves: the CPU)")
    parser.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_loading_args(parser)
    parser.set_defaults(run=_run_export)


def add_loading_args(parser: argparse.ArgumentParser, *, verify: bool = True, pickle: bool = True) -> None:
    """The explicit opt-outs of a command that reads models: ``--no-verify`` (a lowbit checkpoint's
    manifest is not checked) when ``verify``, ``--allow-pickle`` (pickle weights are read) when
    ``pickle``; the same names for every command, matching the API's ``verify=``/``allow_pickle=``."""
    if verify:
        parser.add_argument("--no-verify", dest="verify", action="store_false", help=NO_VERIFY_HELP)
    if pickle:
        parser.add_argument("--allow-pickle", action="store_true", help=ALLOW_PICKLE_HELP)


def add_device_arg(parser: argparse.ArgumentParser, what: str) -> None:
    """``--device`` (``lowbit.device``): where ``what`` runs; checked before the slow load."""
    parser.add_argument("--device", default="cpu", metavar="{cpu,cuda,cuda:N,auto}",
                        help=f"where {what} run (default cpu; auto: cuda when torch sees a GPU). The model stays on "
                             "the CPU between blocks and the compiled kernels are CPU only")


def _table_help(table: dict[str, Any]) -> str:
    return "; ".join(f"{name}: {entry.summary}" for name, entry in table.items())


def add_calibration_args(parser: argparse.ArgumentParser, title: str) -> argparse._ArgumentGroup:
    """``--calib``, ``--calib-samples``, ``--calib-seqlen``, ``--seed``: where calibration windows come from."""
    cal = parser.add_argument_group(title)
    cal.add_argument("--calib", help="calibration text file or directory (default: WikiText-2 valid)")
    cal.add_argument("--calib-samples", type=int, default=128, help="calibration windows (default 128)")
    cal.add_argument("--calib-seqlen", type=int, default=512, help="tokens per window (default 512)")
    cal.add_argument("--calib-generated", type=int, default=0, metavar="N",
                     help="of the --calib-samples windows, N are sampled from the float model itself (temperature 1, "
                          "from BOS; self-calibration: the model's own mixture of domains), the rest cut from --calib")
    cal.add_argument("--seed", type=int, default=0, help="seed of the window sampling (default 0)")
    return cal


def _run_pull(args: argparse.Namespace) -> int:
    from lowbit.sources import pull

    print(pull(args.name, progress=not args.quiet, hashes=True))  # asked for by name: every byte is checked
    return 0


def recipe_from_args(args: argparse.Namespace):
    from lowbit.act_scheme import ActScheme
    from lowbit.pipeline.recipe import Recipe
    from lowbit.scheme import QuantScheme

    recipe = Recipe.load(args.recipe) if args.recipe else Recipe()
    activations = recipe.activations
    if args.acts is not None:
        static = args.act_mode == "static"
        activations = ActScheme(format=args.acts, dynamic=not static,
                                granularity="tensor" if static else (args.act_granularity or "token"),
                                observer=args.act_observer, percentile=args.act_percentile,
                                outlier_ratio=args.act_outlier_ratio)
    elif args.act_outlier_ratio is not None:
        raise ValueError("--act-outlier-ratio needs --acts with --act-mode static")
    weight_flags = (args.format, args.bits, args.group_size, args.per_tensor or None, args.per_channel or None)
    base = recipe.default
    if args.weights is not None:
        base = ActScheme(format=args.weights).weight_scheme()
    elif args.acts is not None and not args.recipe and all(f is None for f in weight_flags):
        base = activations.weight_scheme()
    scheme = base.to_dict()
    scheme.pop("version")
    method, method_config, transforms = _method_from_args(args, recipe)
    if method == "squeezellm" and args.format is None and scheme["format"] != "lut":
        scheme.update(format="lut", granularity="channel", group_size=None, symmetric=True)  # a table per row
    elif method != "squeezellm" and (args.format == "lut" or (args.format is None and scheme["format"] == "lut")):
        raise ValueError(f"format lut stores the lookup tables --method squeezellm fits; {method} cannot fill them "
                         "(use --method squeezellm or another --format)")
    if args.format is not None:
        scheme["format"] = args.format
        if args.bits is None:
            scheme["bits"] = 8 if args.format.startswith("fp8") else 2 if args.format == "ternary" else 4
    if args.bits is not None:
        scheme["bits"] = args.bits
    if args.per_channel:
        scheme.update(granularity="channel", group_size=None)
    elif args.per_tensor:
        scheme.update(granularity="tensor", group_size=None)
    elif args.group_size is not None:
        scheme.update(granularity="group", group_size=args.group_size)
    for key in ("symmetric", "zero_point", "observer", "double_quant"):
        if getattr(args, key) is not None:
            scheme[key] = getattr(args, key)
    if args.zero_point is not None and scheme["symmetric"]:  # the scheme would record a zero-point it never reads
        raise ValueError(f"--zero-point {args.zero_point} sets an asymmetric scheme's zero-point, but the scheme "
                         f"({scheme['format']}) is symmetric; add --asym (int formats) or drop --zero-point")
    scheme = _codebook_scheme(args, method, scheme)
    return Recipe(method=method, method_config=method_config, transforms=transforms, default=QuantScheme(**scheme),
                  overrides=recipe.overrides, skip=tuple(args.skip) if args.skip else recipe.skip,
                  group_fallback=args.group_fallback or recipe.group_fallback, activations=activations,
                  holdout=_holdout_from_args(args, recipe.holdout))


def _holdout_from_args(args: argparse.Namespace, holdout: Any) -> Any:
    """``--holdout K`` and ``--holdout-candidates`` over the recipe file's ``holdout``."""
    from lowbit.pipeline.holdout import HoldOut, MethodChoice

    if args.holdout is None and args.holdout_candidates is None:
        return holdout
    if args.holdout is None and holdout is None:
        raise ValueError("--holdout-candidates lists what the held-out choice chooses among; add --holdout K")
    every = args.holdout if args.holdout is not None else holdout.every
    if args.holdout_candidates is not None:
        candidates = tuple(MethodChoice.parse(c) for c in args.holdout_candidates.split(",") if c.strip())
    else:
        candidates = holdout.candidates if holdout is not None else (MethodChoice("rtn"),)
    return HoldOut(every, candidates)


CODEBOOK_METHODS = ("vq", "pq")


def _codebook_scheme(args: argparse.Namespace, method: str, scheme: dict[str, Any]) -> dict[str, Any]:
    """The scheme fields of ``--method vq/pq``: format vq, ``--vq-dim``, ``--codebook-bits``; vq per
    tensor unless a granularity flag is given, pq codebooks per ``--group-size`` columns shared by every row."""
    flags = {"--vq-dim": args.vq_dim, "--codebook-bits": args.codebook_bits}
    if method not in CODEBOOK_METHODS:
        given = [f for f, v in flags.items() if v is not None]
        if given:
            raise ValueError(f"{' and '.join(given)} set the codebooks of --method vq or pq; the recipe runs {method}")
        return scheme
    if args.format is not None or args.bits is not None:
        raise ValueError(f"--method {method} stores codebooks: give --vq-dim and --codebook-bits instead of "
                         "--format/--bits")
    scheme = dict(scheme, format="vq", bits=8 if args.codebook_bits is None else args.codebook_bits,
                  vector_dim=4 if args.vq_dim is None else args.vq_dim, symmetric=True, double_quant=False)
    scheme.pop("zero_point", None)
    if method == "pq":
        if args.per_channel or args.per_tensor:
            raise ValueError("--method pq has one codebook per --group-size input columns; drop "
                             "--per-channel/--per-tensor (or use --method vq)")
        return dict(scheme, granularity="group", group_size=args.group_size or 64, shared_codebook=True)
    if args.group_size is None and not args.per_channel:
        scheme.update(granularity="tensor", group_size=None)
    return scheme


# Flags that set one knob of a method's or transform's config: flag -> (table name, config field).
KNOB_FLAGS = {"damp": ("gptq", "damp"), "act_order": ("gptq", "act_order"), "smoothquant_alpha": ("smoothquant", "alpha"),
              "outlier_fraction": ("squeezellm", "outlier_fraction"), "fisher_samples": ("squeezellm", "fisher_samples")}


def _method_from_args(args: argparse.Namespace, recipe: Any) -> tuple[str, Any, tuple[Any, ...]]:
    """The method, its config and the transforms: ``--method`` (a shorthand, ``method_shorthand``)
    replaces the recipe file's method and transforms; ``--transform``/``--rotate`` add to them, the
    rotation first; ``KNOB_FLAGS`` set fields of the configs."""
    from dataclasses import replace

    from lowbit.methods import TransformKind, get_method, get_transform
    from lowbit.pipeline.recipe import TransformStep, method_shorthand

    if args.method is not None:
        method, implied = method_shorthand(args.method)
        same = method == recipe.method and not implied
        config = recipe.method_config if same else get_method(method).default_config()
        steps = [TransformStep(t) for t in implied]
    else:
        method, config, steps = recipe.method, recipe.method_config, list(recipe.transforms)
    added = [t for t in dict.fromkeys([*(args.transform or []), *(["hadamard"] if args.rotate else [])])
             if t not in [s.name for s in steps]]
    rotations = [t for t in added if get_transform(t).kind is TransformKind.ROTATION]
    steps = [*map(TransformStep, rotations), *steps, *(TransformStep(t) for t in added if t not in rotations)]
    for flag, (owner, knob) in KNOB_FLAGS.items():
        value = getattr(args, flag)
        if value is None:
            continue
        if owner == method:
            config = replace(config, **{knob: value})
        elif owner in [s.name for s in steps]:
            steps = [TransformStep(s.name, replace(s.config, **{knob: value})) if s.name == owner else s for s in steps]
        else:
            raise ValueError(f"--{flag.replace('_', '-')} sets {owner}'s {knob}, but the recipe runs "
                             f"{'+'.join([*(s.name for s in steps), method])}; drop the flag or use {owner}")
    return method, config, tuple(steps)


def _run_quantize(args: argparse.Namespace) -> int:
    from lowbit.api import recipe_features
    from lowbit.device import resolve_device
    from lowbit.io.checkpoint import is_lowbit_checkpoint
    from lowbit.io.export import check_export
    from lowbit.io.export.gguf import lossless_file_type
    from lowbit.pipeline import distributed

    recipe = recipe_from_args(args)
    args.device = resolve_device(args.device)  # an absent GPU is refused before the slow load
    args.slices = distributed.Slices(args.reduction_slices or 1)
    if distributed.launched():  # torchrun: every rank computes, rank 0 alone writes
        if args.work_dir:
            raise ValueError("--work-dir runs in one process; start it without torchrun")
        args.slices = distributed.init({"recipe": recipe.to_dict(), "model": args.model, "calib": args.calib,
                                        "samples": args.calib_samples, "seqlen": args.calib_seqlen, "seed": args.seed,
                                        "generated": args.calib_generated, "slices": args.reduction_slices,
                                        "true_sequential": args.true_sequential})
        if args.reduction_slices not in (None, args.slices.world):
            raise ValueError(f"torchrun started {args.slices.world} ranks, so --reduction-slices must be "
                             f"{args.slices.world} (one slice per rank) or left out, not {args.reduction_slices}")
        if args.slices.rank != 0:
            return _quantize_and_write(args, recipe, None, None)
    if Path(args.model).is_dir() and is_lowbit_checkpoint(args.model):
        raise ValueError(f"{args.model} is a lowbit checkpoint, already quantized; quantize the float model it was "
                         "made from (lowbit export re-encodes a checkpoint into another format)")
    out = Path(args.output)
    # everything checkable is checked, and the outputs locked, before the slow load and quantization
    check_export("lowbit", out, overwrite=args.overwrite)
    gguf_type = None
    if args.gguf:
        check_export("gguf", args.gguf, overwrite=args.overwrite, features=recipe_features(recipe),
                     options={"type": args.gguf_type})
        gguf_type = args.gguf_type or lossless_file_type([recipe.default])
    parameters = parameter_count(args.model)
    sizes = {out: expected_bytes(parameters, recipe.default.bits)}
    if args.gguf:
        sizes[Path(args.gguf)] = expected_bytes(parameters, gguf_bits(gguf_type))
    with ExitStack() as outputs:
        for path, needed in sizes.items():
            outputs.enter_context(reserve_output(path, args.overwrite, needed))
        return _quantize_and_write(args, recipe, out, gguf_type)


def _quantize_and_write(args: argparse.Namespace, recipe: Any, out: Path | None, gguf_type: str | None) -> int:
    """The slow part of ``quantize``, run while its outputs are reserved: load, quantize, write
    (``out`` None: a rank other than 0 of a torchrun job, which only computes)."""
    from lowbit.api import export, load, needs_calibration, quantize
    from lowbit.sources import needs_bos

    if args.work_dir:
        from lowbit.pipeline.streamed_job import quantize_streamed

        if args.calib_generated:
            raise ValueError("--calib-generated samples from the whole float model, which a --work-dir job never "
                             "holds; calibrate on text (--calib) or drop --work-dir")

        if args.gguf:
            raise ValueError("--gguf is not written by a --work-dir job; export the checkpoint it writes with "
                             f"lowbit export-gguf {out} -o {args.gguf}")
        print(quantize_streamed(args.model, recipe, out, Path(args.work_dir),
                                windows=lambda model, tokenizer: _calibration_windows(args, model, tokenizer),
                                provenance={"path": args.calib or "wikitext-2 valid (default)",
                                            "samples": args.calib_samples, "seqlen": args.calib_seqlen,
                                            "seed": args.seed, "true_sequential": args.true_sequential},
                                true_sequential=args.true_sequential, overwrite=args.overwrite,
                                progress=not args.quiet, device=args.device))
        return 0

    model, tokenizer = load(args.model, allow_pickle=args.allow_pickle, dequantize=True)  # a .gguf: float weights
    calibration, provenance, allocation = None, None, None
    allocating = args.target_bpw is not None or args.target_size is not None
    if needs_calibration(recipe) or allocating:
        calibration = _calibration_windows(args, model, tokenizer)
        provenance = {"path": args.calib or "wikitext-2 valid (default)", "samples": args.calib_samples,
                      "seqlen": args.calib_seqlen, "seed": args.seed, "true_sequential": args.true_sequential,
                      "bos": needs_bos(tokenizer), "generated": args.calib_generated}
    if allocating:
        allocation = _allocate(args, model, tokenizer, recipe, calibration)
        recipe = allocation.recipe
        print(allocation.summary())
    report = quantize(model, recipe, calibration=calibration if needs_calibration(recipe) else None,
                      true_sequential=args.true_sequential, progress=not args.quiet and args.slices.rank == 0,
                      slices=args.slices, device=args.device)
    if report.chosen:  # the held-out choice: the stored recipe names each linear's method
        from collections import Counter

        from lowbit.pipeline.recipe import pinned_recipe

        recipe = pinned_recipe(recipe, report.chosen, report.layers)
        counts = Counter(c.label for c in report.chosen.values())
        print("held-out choice: " + ", ".join(f"{label} x{n}" for label, n in counts.most_common()))
    if args.slices.distributed:
        from lowbit.pipeline.distributed import barrier

        barrier("writing the output")  # every rank finished: only now does rank 0 write
        if out is None:
            return 0
    saved = export(model, tokenizer, out, to="lowbit", overwrite=args.overwrite, recipe=recipe, provenance=provenance,
                   allocation=None if allocation is None else allocation.to_dict())
    if allocation is not None and allocation.budget.size_bytes is not None:
        disk = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
        if disk > allocation.budget.size_bytes:  # the margins are meant to make this impossible: say so loudly
            raise RuntimeError(f"{out} is {disk:,} bytes, over the target {allocation.budget.size_bytes:,}: "
                               "the allocator's estimate of the checkpoint's fixed bytes was short")
    acts = f", activations {recipe.activations.describe()}" if recipe.activations is not None else ""
    if report.activations is not None and report.activations.dynamic_layers:
        acts += (f"; {len(report.activations.dynamic_layers)} outlier layers on dynamic per-token scales: "
                 + ", ".join(report.activations.dynamic_layers))
    print(f"{out}: {len(report.layers)} layers {recipe.default.describe()}{acts} ({recipe.describe_method()}), "
          f"{saved.bpw:.4f} bits/weight, {saved.size_bytes / 2**20:.1f} MiB, kept in float: "
          f"{', '.join(report.kept_float) or 'none'}; quantized in {report.seconds:.1f} s")
    if args.gguf:
        try:
            gguf = export(model, tokenizer, args.gguf, to="gguf", overwrite=args.overwrite, type=gguf_type)
        except Exception as e:
            if not is_user_error(e):
                raise
            raise ValueError(f"{out} was written, but {args.gguf} was not ({one_line(e)}); write it with "
                             f"lowbit export-gguf {out} -o {args.gguf}") from None
        print("\n".join(gguf.summary()))
    return 0


def _allocate(args: argparse.Namespace, model: Any, tokenizer: Any, recipe: Any, calibration: Any):
    """``lowbit.auto.allocate`` for ``--target-bpw`` / ``--target-size`` with the recipe's method, transforms
    and held-out choice (``--holdout``)."""
    import tempfile

    from lowbit.auto import Budget, allocate, parse_size

    if args.recipe and recipe.overrides:
        raise ValueError("--target-bpw/--target-size choose every layer's scheme; drop the recipe's overrides "
                         "(or the target)")
    if recipe.activations is not None:
        raise ValueError("--target-bpw/--target-size choose weight-only schemes; drop --acts (W8A8 takes one "
                         "8-bit scheme) or the target")
    budget = Budget(bpw=args.target_bpw) if args.target_bpw is not None else Budget(size_bytes=parse_size(args.target_size))
    extra = 0
    if budget.size_bytes is not None and tokenizer is not None:  # its files go into the checkpoint as they are
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer.save_pretrained(tmp)
            extra = sum(f.stat().st_size for f in Path(tmp).iterdir() if f.is_file())
    return allocate(model, calibration, budget, method=recipe.method, method_config=recipe.method_config,
                    transforms=recipe.transforms, holdout=recipe.holdout, extra_bytes=extra, progress=not args.quiet)


def _run_pareto(args: argparse.Namespace) -> int:
    from lowbit.api import load
    from lowbit.auto.pareto import peer_rows, run_pareto, write_report
    from lowbit.evaluate.text import default_eval_path, read_text, token_windows
    from lowbit.pipeline.recipe import method_shorthand
    from lowbit.sources import needs_bos

    try:
        budgets = [float(b) for b in args.budgets.split(",") if b.strip()]
    except ValueError:
        raise ValueError(f"--budgets {args.budgets!r} is not a comma-separated list of numbers, e.g. 3,3.5,4") from None
    if not budgets or any(not 0 < b < 64 for b in budgets):
        raise ValueError(f"--budgets {args.budgets!r}: give bits per weight between 0 and 64, e.g. 3,3.5,4")
    if args.windows < 1:
        raise ValueError(f"--windows must be >= 1, got {args.windows}")
    method, transforms = method_shorthand(args.method)
    if transforms:
        raise ValueError(f"--method {args.method}: pareto runs one method without transforms (rtn, hqq, gptq)")
    peers = [row for path in args.peers for row in peer_rows(path)]  # a bad file is refused before the slow work
    reference, tokenizer = load(args.model, dequantize=True)
    bos_id = tokenizer.bos_token_id if needs_bos(tokenizer) else None
    windows = token_windows(read_text(args.data or default_eval_path()), tokenizer, seqlen=512,
                            max_windows=args.windows)
    calibration = _calibration_windows(args, reference, tokenizer)
    rows = run_pareto(lambda: load(args.model, dequantize=True)[0], reference, calibration, windows, budgets, bos_id=bos_id,
                      method=method, progress=not args.quiet)
    title = (f"{Path(str(args.model)).name}: mixed precision ({method}) under bits-per-weight budgets, "
             f"{windows.shape[0]} x 512 tokens of {'WikiText-2 test' if not args.data else Path(args.data).name}")
    md, png = write_report(rows + peers, args.output, title)
    print(md.read_text(), end="")
    print(f"plot: {png}")
    return 0


def _run_eval(args: argparse.Namespace) -> int:
    from lowbit.api import load
    from lowbit.device import resolve_device
    from lowbit.evaluate.perplexity import evaluate_windows
    from lowbit.evaluate.size import size_report
    from lowbit.evaluate.speed import process_rss_bytes
    from lowbit.evaluate.text import default_eval_path, read_text, token_windows
    from lowbit.sources import needs_bos

    text = read_text(args.data or default_eval_path())  # fail on a bad path before the slow load
    device = resolve_device(args.device)
    if args.runtime == "llama.cpp" and not str(args.model).endswith(".gguf"):
        raise ValueError(f"--runtime llama.cpp runs .gguf files; {args.model} is not one")
    if args.runtime == "llama.cpp" and device.type != "cpu":
        raise ValueError(f"--device {args.device} is for --runtime torch; llama-cpp-python runs where it was built to")
    start = time.perf_counter()
    if args.runtime == "llama.cpp":
        from transformers import AutoTokenizer

        from lowbit.gguf.check import check_gguf
        from lowbit.gguf.llama_cpp import LlamaCppModel

        path = Path(args.model)
        check_gguf(path)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = LlamaCppModel(path, n_ctx=args.seqlen + 1)
    else:
        from lowbit.nn import prepare_kernels

        model, tokenizer = load(args.model, verify=args.verify, allow_pickle=args.allow_pickle)
        if device.type != "cpu":
            model.to(device)  # before the kernels are chosen: they are chosen by device
        prepare_kernels(model, activations="float32")  # evaluation measures the model, not an activation option
    load_seconds = time.perf_counter() - start
    rss = process_rss_bytes()
    if tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer files; save the tokenizer beside the model")
    windows = token_windows(text, tokenizer, args.seqlen, args.max_windows,
                            max_context=getattr(getattr(model, "config", None), "max_position_embeddings", None))
    bos = needs_bos(tokenizer) if args.bos == "auto" else args.bos == "yes"
    reference = None
    if args.reference:
        from lowbit.nn import prepare_kernels

        reference = load(args.reference, verify=args.verify, allow_pickle=args.allow_pickle)[0]
        if device.type != "cpu":
            reference.to(device)
        prepare_kernels(reference, activations="float32")
    result = evaluate_windows(model, windows, bos_id=tokenizer.bos_token_id if bos else None,
                              reference=reference, progress=not args.quiet)
    out: dict[str, Any] = {"model": str(args.model), "runtime": _runtime(args), **result.to_dict(),
                           "load_seconds": load_seconds, "rss_bytes_after_load": rss}
    if args.runtime == "torch":
        size = size_report(model)
        out.update(bpw=size.bpw, size_bytes=size.size_bytes)
    else:
        out.update(size_bytes=Path(args.model).stat().st_size)
    if args.json:
        print_json(out)
    else:
        lines = [f"{k:>22}: {v:.6g}" if isinstance(v, float) else f"{k:>22}: {v}" for k, v in out.items()]
        print("\n".join(lines))
    return 0


def _run_export(args: argparse.Namespace) -> int:
    from lowbit.device import resolve_device
    from lowbit.io.export import check_export

    args.device = resolve_device(args.device)  # an absent GPU is refused before the slow load
    options = _export_options(args)
    if args.check:
        return _print_lossless(args)
    if args.output is None:
        raise ValueError(f"export --to {args.to} needs -o/--output (or --check to write nothing)")
    target = getattr(args, "target_size", None)
    if target is not None and args.to != "gguf":
        raise ValueError(f"--target-size chooses GGUF tensor types; for --to {args.to} use lowbit quantize --target-size")
    candidates = _target_types(args.target_types, target) if getattr(args, "target_types", None) else None
    if target is not None and not options.get("type"):
        from lowbit.gguf.mixes import FILE_TYPES  # a mix's name names the file type too; a size gets Q4_K_M's

        options["type"] = target.upper() if target.upper() in FILE_TYPES else "Q4_K_M"
    exporter = check_export(args.to, args.output, overwrite=args.overwrite, options=options)  # before the slow load
    needed = (expected_bytes(parameter_count(args.model), gguf_bits(options["type"])) if options.get("type")
              else stored_bytes(args.model))  # without a type, the checkpoint's codes are written as they are
    with reserve_output(args.output, args.overwrite, needed):
        return _load_and_export(args, exporter, options, candidates)


def _load_and_export(args: argparse.Namespace, exporter: Exporter, options: dict[str, Any],
                     candidates: list[Any] | None = None) -> int:
    """The slow part of ``export``, run while its output is reserved: load, collect statistics, write
    (``candidates``: the GGUF types ``--target-size`` chooses among, None for the default set)."""
    from lowbit.api import export, load
    from lowbit.io.checkpoint import is_lowbit_checkpoint, read_quantization_config
    from lowbit.io.export import Statistics
    from lowbit.io.prequantized import prequantized_source
    from lowbit.nn import linear_schemes
    from lowbit.pipeline.recipe import Recipe, recipe_describing

    windows = None
    target = getattr(args, "target_size", None)
    plain = exporter.statistics(options) is Statistics.NONE and target is None
    lazy = _lazy_float_model(args.model) if args.to == "gguf" and plain else None  # weights read as written
    model, tokenizer = lazy or load(args.model, verify=args.verify, allow_pickle=args.allow_pickle)
    if exporter.records_recipe and is_lowbit_checkpoint(args.model):  # a float model is refused by the table
        recorded = read_quantization_config(args.model, verify=False)  # load verified it just now
        options.update(recipe=Recipe.from_dict(recorded["recipe"]), provenance=recorded.get("calibration"))
    elif exporter.records_recipe and prequantized_source(args.model):
        options.update(recipe=recipe_describing(linear_schemes(model)),
                       provenance={"imported": f"codes read from {args.model} as they were stored; the recipe "
                                               "names their schemes, it did not make them"})
    if exporter.statistics(options) is not Statistics.NONE or target is not None:
        windows = _calibration_windows(args, model, tokenizer)
    if target is not None:
        from lowbit.auto import GGUF_CANDIDATES, allocate_gguf

        allocation = allocate_gguf(model, tokenizer, windows, target, method="gptq" if options.get("gptq") else "rtn",
                                   candidates=candidates or GGUF_CANDIDATES, progress=not args.quiet)
        options["tensor_types"] = allocation.gguf_types
        print(allocation.summary(), file=sys.stderr if args.json else sys.stdout)
    report = export(model, tokenizer, args.output, to=args.to, overwrite=args.overwrite, calibration=windows,
                    progress=not args.quiet, device=args.device, **options)
    print_json(report.to_dict()) if args.json else print("\n".join(report.summary()))
    return 0


def _target_types(text: str, target: str | None) -> list[Any]:
    """``--target-types`` as allocation candidates; one line for a misuse or an unknown type."""
    from lowbit.auto import Candidate

    if target is None:
        raise ValueError("--target-types lists what --target-size chooses among; add --target-size SIZE|MIX")
    names = [t.strip().upper() for t in text.split(",") if t.strip()]
    if not names:
        raise ValueError(f"--target-types {text!r} names no type; e.g. Q4_0,Q5_0,Q6_K,Q8_0")
    try:
        return [Candidate.of_gguf(n) for n in dict.fromkeys(names)]
    except ValueError as e:
        raise ValueError(f"--target-types: {e}") from None


def _lazy_float_model(source: str) -> tuple[Any, Any] | None:
    """(model, tokenizer) of a local float model directory (or demo) with its weights left on disk
    (``lowbit.pipeline.lazy_model``), which the GGUF export reads one tensor at a time; None for any
    other source (a lowbit or pre-quantized checkpoint, a hub id, a .gguf file), which loads whole."""
    from lowbit.io.checkpoint import is_lowbit_checkpoint
    from lowbit.io.config_json import read_config_json
    from lowbit.io.prequantized import prequantized_method
    from lowbit.io.source_checks import check_causal_lm
    from lowbit.io.tokenizer_files import load_tokenizer
    from lowbit.pipeline.lazy_model import load_lazy
    from lowbit.sources import resolve_model

    try:
        resolved = resolve_model(source)
    except ValueError:
        return None  # load() names what is wrong with it
    if resolved.kind not in ("hf_dir", "demo") or is_lowbit_checkpoint(resolved.path) \
            or prequantized_method(resolved.path) is not None:
        return None
    check_causal_lm(read_config_json(resolved.path), str(Path(resolved.path) / "config.json"))
    try:
        model = load_lazy(resolved.path)
    except (FileNotFoundError, ValueError):
        return None  # no safetensors weights: load() refuses a pickle, or reads it with --allow-pickle
    return model, load_tokenizer(resolved.path, repr(source))


def _print_lossless(args: argparse.Namespace) -> int:
    """``export --check``: per quantized layer of the checkpoint, lossless onto ``--to`` or why not."""
    from lowbit.io.checkpoint import read_quantization_config
    from lowbit.io.export import get_exporter, lossless_layers
    from lowbit.scheme import QuantScheme

    schemes = {name: QuantScheme.from_dict(entry["scheme"])
               for name, entry in read_quantization_config(args.model, verify=args.verify)["layers"].items()}
    lossless = lossless_layers(args.to, schemes)
    if args.json:
        print_json({"to": args.to, "layers": lossless})
        return 0
    for name, why in lossless.items():
        verdict = "re-encoded: " if get_exporter(args.to).requantizes else "refused: "
        print(f"{name:<48} {schemes[name].describe():<22} {'lossless' if why is None else verdict + why}")
    print(f"{sum(why is None for why in lossless.values())} of {len(lossless)} quantized layers map losslessly "
          f"onto {args.to}")
    return 0


def _export_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options given on the command line for ``--to``; one for another format is an error."""
    options = {}
    for name, owner in args.export_options.items():
        value = getattr(args, name)
        if value is None:
            continue
        if owner != args.to:
            raise ValueError(f"--{name.replace('_', '-')} applies to --to {owner}, not --to {args.to}")
        options[name] = value
    return options


def _calibration_windows(args: argparse.Namespace, model: Any, tokenizer: Any):
    """Token windows ``[--calib-samples, --calib-seqlen]`` from ``--calib`` (BOS first when the tokenizer adds one)."""
    import torch

    from lowbit.pipeline.calibration import calibration_windows, generated_windows, generation_start_id
    from lowbit.sources import needs_bos

    bos_id = tokenizer.bos_token_id if needs_bos(tokenizer) else None
    generated = args.calib_generated
    if not 0 <= generated <= args.calib_samples:
        raise ValueError(f"--calib-generated must be between 0 and --calib-samples ({args.calib_samples}), got {generated}")
    windows = []
    if generated < args.calib_samples:
        windows.append(calibration_windows(tokenizer, path=args.calib, samples=args.calib_samples - generated,
                                           seqlen=args.calib_seqlen, seed=args.seed, bos_id=bos_id,
                                           max_context=getattr(model.config, "max_position_embeddings", None)))
    if generated:
        windows.append(generated_windows(model, generated, args.calib_seqlen, start_id=generation_start_id(tokenizer),
                                         seed=args.seed))
    return torch.cat(windows)


def _run_finetune(args: argparse.Namespace) -> int:
    from lowbit.train import qlora

    if args.eval_windows < 0:
        raise ValueError(f"--eval-windows must be >= 0 (0: skip), got {args.eval_windows}")

    targets = {"targets": tuple(t for t in args.target.split(",") if t)} if args.target is not None else {}
    lora = qlora.LoraSettings(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout, **targets)
    settings = qlora.TrainSettings(data=args.data, steps=args.steps, seqlen=args.seqlen, batch_size=args.batch_size,
                                   lr=args.lr, warmup=args.warmup, holdout=args.holdout, seed=args.seed,
                                   gradient_checkpointing=args.gradient_checkpointing)
    sizes = {args.output: None}  # an adapter is small: r rows and columns per adapted linear
    if args.merge:
        sizes[args.merge] = expected_bytes(parameter_count(args.model), 32 if args.quant == "none" else 4)
    with ExitStack() as outputs:  # checked and locked before the slow load and training
        for path, needed in sizes.items():
            outputs.enter_context(reserve_output(path, args.overwrite, needed))
        return _train_and_write(args, settings, lora)


def _train_and_write(args: argparse.Namespace, settings: Any, lora: Any) -> int:
    """The slow part of ``finetune``, run while its outputs are reserved: load, train, save."""
    from lowbit.config import LowbitConfig
    from lowbit.train import qlora

    config = None if args.quant == "none" else LowbitConfig(
        load_in_4bit=True, quant_type=args.quant, block_size=args.block_size, double_quant=args.double_quant,
        compute_dtype=args.compute_dtype)
    model, tokenizer = qlora.load_base(args.model, config, verify=args.verify, allow_pickle=args.allow_pickle)
    peft_model = (qlora.load_adapter(model, args.resume, allow_pickle=args.allow_pickle) if args.resume
                  else qlora.add_lora(model, lora))
    before = qlora.heldout_perplexity(peft_model, tokenizer, settings, args.eval_windows) if args.eval_windows else None
    report = qlora.train(peft_model, tokenizer, settings, progress=not args.quiet)
    after = qlora.heldout_perplexity(peft_model, tokenizer, settings, args.eval_windows) if args.eval_windows else None
    qlora.save_adapter(peft_model, args.output, base=str(args.model), overwrite=args.overwrite)
    if args.merge:
        qlora.merge_and_save(peft_model, args.merge, tokenizer, overwrite=args.overwrite)
    out = {"adapter": str(args.output), "merged": args.merge, **report.to_dict(),
           "heldout_ppl_before": before, "heldout_ppl_after": after}
    out["losses"] = [round(x, 4) for x in report.losses]
    if args.json:
        print_json(out)
        return 0
    tail = report.losses[-10:]
    print(f"{args.output}: {report.steps} steps, {report.seconds_per_step:.2f} s/step, "
          f"loss {report.losses[0]:.4f} -> {sum(tail) / len(tail):.4f} (mean of last {len(tail)}), "
          f"{report.trainable_params:,} trainable parameters, optimizer state "
          f"{report.optimizer_state_bytes / 2**20:.1f} MiB, peak RSS {report.peak_rss_bytes / 2**20:.0f} MiB")
    if before is not None:
        print(f"held-out perplexity ({args.eval_windows} windows of {args.seqlen}): {before:.3f} -> {after:.3f}")
    if args.merge:
        print(f"merged model: {args.merge}")
    return 0


def _run_train(args: argparse.Namespace) -> int:
    from lowbit.train.qat import QatSettings
    from lowbit.train.qat_checkpoint import summary, train_checkpoint

    settings = QatSettings(
        stages=tuple(s for s in args.stage.split(",") if s), data=args.data, seqlen=args.seqlen, samples=args.samples,
        block_seqlen=args.block_seqlen,
        heldout=args.heldout, batch_size=args.batch_size, block_batch_size=args.block_batch_size, block_epochs=args.block_epochs, block_lr=args.block_lr,
        weight_lr=args.weight_lr, steps=args.steps, lr=args.lr, e2e_weight_lr=args.e2e_weight_lr, topk=args.topk, log_every=args.log_every,
        eval_every=args.eval_every, save_every=args.save_every, seed=args.seed,
        gradient_checkpointing=args.gradient_checkpointing, compute_dtype=args.compute_dtype)
    with reserve_output(args.output, args.overwrite, stored_bytes(args.student)):
        report = train_checkpoint(args.student, args.teacher, args.output, settings, state_dir=args.state_dir,
                                  resume=args.resume, overwrite=args.overwrite, verify=args.verify,
                                  allow_pickle=args.allow_pickle, log=None if args.quiet else print)
    if args.json:
        print_json(summary(report))
        return 0
    kl = ", ".join(f"{stage}{'' if step < 0 else f' step {step}'} {value:.4f}" for stage, step, value in report.heldout_kl)
    print(f"{args.output}: trained {', '.join(settings.stages)} in {report.seconds['total']:.0f} s "
          f"(teacher passes included), {report.trainable_params:,} trainable parameters, "
          f"peak RSS {report.peak_rss_bytes / 2**20:.0f} MiB; held-out KL (top-{settings.topk}): {kl}")
    return 0


def _runtime(args: argparse.Namespace) -> str:
    """What ran the model, as the output states it."""
    if args.runtime == "llama.cpp":
        from lowbit.gguf.llama_cpp import llama_cpp_version

        return f"llama.cpp (llama-cpp-python {llama_cpp_version()})"
    if str(args.model).endswith(".gguf"):
        return "torch (the GGUF's blocks as lowbit codes where their type maps, else dequantized to float32)"
    return "torch"


def _run_info(args: argparse.Namespace) -> int:
    from lowbit.io.checkpoint import checkpoint_info
    from lowbit.pipeline.recipe import Recipe

    info = checkpoint_info(args.checkpoint, verify=args.verify)
    recipe = info.pop("recipe")
    info["method"] = Recipe.from_dict(recipe).describe_method() if recipe else "from_pretrained (LowbitConfig)"
    if args.json:
        print_json(info, indent=2)
        return 0
    allocation = info.get("allocation")
    why = {t["name"]: t["why"] for t in allocation["tensors"]} if allocation else {}
    stored = Recipe.from_dict(recipe) if recipe else None
    pinned = stored is not None and any(o.method is not None for o in stored.overrides)
    print(f"{'layer':<48} {'shape':>12} {'scheme':<22} {'bpw':>7}" + ("  why (allocated)" if why else ""))
    for row in info["layers"]:
        shape = "x".join(map(str, row["shape"]))
        act = ""
        if "act" in row:
            act = f"  act {row['act']}" + (f" scale {row['input_scale']:.6g}" if row["input_scale"] is not None else "")
        if row.get("input_hadamard"):
            act += "  input rotated (online Hadamard)"
        if "codebook_shape" in row:
            act += f"  codebook {'x'.join(map(str, row['codebook_shape']))} f16 ({row['codebook_bpw']:.3f} bpw)"
        if "outliers" in row:
            act += f"  outliers {row['outliers']:,} ({row['outlier_bpw']:.3f} bpw)"
        if row["name"] in why:
            act += f"  {why[row['name']]}"
        if pinned:
            act += f"  method {stored.method_for(row['name']).label}"
        print(f"{row['name']:<48} {shape:>12} {row['scheme']:<22} {row['bpw']:>7.4f}{act}")
    print(f"quantized: {info['quantized_layers']} layers, {info['quantized_weights']:,} weights, "
          f"{info['bpw']:.4f} bits/weight; kept in float: {', '.join(info['float_tensors_sample'])}...")
    print(f"size on disk: {info['disk_bytes']:,} bytes ({info['disk_bytes'] / 2**20:.1f} MiB); recipe method "
          f"{info['method']}")
    if allocation:
        budget = allocation["budget"]
        asked = f"{budget['bpw']:g} bits/weight" if budget["bpw"] is not None else f"{budget['size_bytes']:,} bytes"
        print(f"allocated by lowbit.auto under {asked}: {allocation['bpw']:.4f} bits/weight over "
              f"{len(allocation['tensors'])} tensors ({', '.join(f'{n} x{k}' for n, k in allocation['counts'].items())}); "
              "the recipe is recipe.json beside the weights")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def _load_for_inference(args: argparse.Namespace):
    """(model, tokenizer) with every quantized layer on the kernel its scheme gets (said once when a
    layer falls back to the reference path)."""
    from lowbit.api import load
    from lowbit.evaluate.generate import set_threads
    from lowbit.nn import prepare_kernels

    set_threads(args.threads)  # a bad count fails before the slow load
    model, tokenizer = load(args.model, verify=args.verify, allow_pickle=args.allow_pickle)
    prepare_kernels(model, activations=args.activations)
    return model, tokenizer


def _run_generate(args: argparse.Namespace) -> int:
    import torch

    from lowbit.evaluate.generate import generate

    model, tokenizer = _load_for_inference(args)
    if tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer files; save the tokenizer beside the model")
    if args.chat and tokenizer.chat_template:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(args.prompt, return_tensors="pt")["input_ids"]
    new: list[int] = []
    shown = ""

    def stream(token: int) -> None:
        nonlocal shown
        new.append(token)
        text = tokenizer.decode(new, skip_special_tokens=True)
        print(text[len(shown):], end="", flush=True)
        shown = text

    result = generate(model, ids, args.max_new_tokens, eos_token_id=tokenizer.eos_token_id, on_token=stream,
                      temperature=args.temperature, seed=args.seed, loop=args.loop)
    print()
    print(f"[{result.prompt_tokens} prompt tokens at {result.prefill_tokens_per_second:.1f} tok/s, "
          f"{len(result.tokens)} new at {result.decode_tokens_per_second:.1f} tok/s, "
          f"threads {torch.get_num_threads()}, {result.loop} loop]", file=sys.stderr)
    return 0


def _run_bench_speed(args: argparse.Namespace) -> int:
    from lowbit.evaluate.generate import bench_speed

    model, _ = _load_for_inference(args)
    report = bench_speed(model, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, repeats=args.repeats,
                         loop=args.loop)
    if args.json:
        print_json(report, indent=2)
        return 0
    print(f"{args.model}: prefill {report['prefill_tokens_per_second']:.1f} tok/s ({report['prompt_tokens']} tokens), "
          f"decode {report['decode_tokens_per_second']:.1f} tok/s ({report['new_tokens']} tokens), "
          f"threads {report['threads']}, {report['loop']} loop, peak RSS {report['peak_rss_mib']:.0f} MiB"
          + ("" if report["huge_pages_mib"] is None else f", {report['huge_pages_mib']:.0f} MiB in huge pages"))
    return 0

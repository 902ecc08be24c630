"""Calibration that holds out of domain: RTN, GPTQ and GPTQ with the held-out choice per tensor
(``lowbit.pipeline.holdout``), lowbit schemes and GGUF types, KL in domain and out of domain.

In domain: WikiText-2 raw test, the first ``--windows`` windows of 512. Out of domain:
``--ood-windows`` windows of 512 tokens of Python's standard library source (``/usr/lib/python3.*/*.py``,
sorted, read at run time; ``bench/mixed_precision.py``'s ``ood_windows``). Calibration: ``--calib-samples``
x 512 tokens of WikiText-2 valid (seed 0). KL is against the float model on the same windows.

Parts (``--parts``; each row written as it finishes, ``--resume`` skips rows already in the file):
- ``lowbit``: for each of ``--schemes``: RTN, GPTQ, GPTQ with the held-out choice between GPTQ and
  RTN (``--holdout``: every k-th calibration window held out), the same with GPTQ at the dampenings
  ``--damps`` as further candidates, plain GPTQ at the largest of those dampenings, and GPTQ on
  self-generated calibration (half, then all of the windows sampled from the float model itself,
  ``lowbit quantize --calib-generated``).
- ``gguf``: for each of ``--gguf-types``: no calibration, lowbit's importance-weighted search
  (``--imatrix``), ``--gptq`` (GPTQ or the search, judged on the statistics they were fitted to) and
  ``--gptq --holdout`` (judged on held-out windows). Scored in float32 after ``lowbit.load(path,
  dequantize=True)`` (transformers' GGUF reader with gguf-py's dequantizers).
The markdown adds, per scheme, each row's KL reduction over the scheme's RTN row (GGUF: the file
without calibration) in both domains and the retention (out-of-domain reduction / in-domain reduction).

Run: ``python bench/calibration_ood.py --model smollm2-135m``; writes
``bench/results/calibration_ood_<model>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SCHEMES = {
    "int4 g64 asym": {"bits": 4, "group_size": 64, "symmetric": False},
    "int3 g64 asym": {"bits": 3, "group_size": 64, "symmetric": False},
}


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        from mixed_precision import domains_setup

        self.args = args
        self.setup, self.calib, self.ood = domains_setup("bench/calibration_ood.py", args)
        self.reference, self.tokenizer = self.setup.reference, self.setup.tokenizer
        self.out = ROOT / "bench" / "results" / f"calibration_ood_{self.setup.name}{args.suffix}.json"
        self.rows: list[dict] = []
        if args.resume and self.out.is_file():
            self.rows = json.loads(self.out.read_text())["rows"]

    def wanted(self, label: str) -> bool:
        """Whether ``--rows`` (exact labels separated by ``|``; empty: all) names this row."""
        return not self.args.rows or label in self.args.rows.split("|")

    def done(self, part: str, scheme: str, label: str) -> bool:
        return any((r["part"], r["scheme"], r["label"]) == (part, scheme, label) for r in self.rows)

    def save(self, row: dict) -> None:
        from bench_results import write_results

        key = (row["part"], row["scheme"], row["label"])
        self.rows = [r for r in self.rows if (r["part"], r["scheme"], r["label"]) != key] + [row]
        print(json.dumps(row), flush=True)
        meta = {**self.setup.meta, "ood": f"{self.args.ood_windows}x512 tokens of /usr/lib/python3.*/*.py (sorted)"}
        write_results(self.out, {"meta": meta, "rows": self.rows}, self.markdown(meta))

    def markdown(self, meta: dict) -> list[str]:
        lines = [f"# Calibration in and out of domain, {meta['model']}", "",
                 f"`{meta['command']}` ({meta['date']}); in domain: WikiText-2 raw test {meta['windows']}x512; "
                 f"out of domain: {meta['ood']}; calibration {meta['calibration']}. Reduction: 1 - KL / KL of the "
                 "scheme's uncalibrated row (RTN; GGUF: the type without calibration); retention: out-of-domain "
                 "reduction / in-domain reduction.", "",
                 "| part | scheme | row | KL | KL out of domain | reduction | reduction out of domain | retention | "
                 "ppl | ppl out of domain | seconds | choices |",
                 "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in self.rows:
            base = next((b for b in self.rows if (b["part"], b["scheme"]) == (r["part"], r["scheme"])
                         and b["label"] in ("rtn", "no calibration")), None)
            red = red_ood = ret = "-"
            if base is not None and r is not base:
                a, b = 1 - r["kld"] / base["kld"], 1 - r["kld_ood"] / base["kld_ood"]
                red, red_ood = f"{a:.1%}", f"{b:.1%}"
                ret = f"{b / a:.0%}" if a > 0 else "-"
            lines.append(f"| {r['part']} | {r['scheme']} | {r['label']} | {r['kld']:.4f} | {r['kld_ood']:.4f} | {red} | "
                         f"{red_ood} | {ret} | {r['ppl']:.3f} | {r['ppl_ood']:.3f} | {r['seconds']:.0f} | "
                         f"{r.get('choices', '')} |")
        return lines

    def evaluate(self, model) -> dict:
        from mixed_precision import evaluate_in_and_out

        return evaluate_in_and_out(model, self.setup, self.ood, progress=False)

    def generated(self) -> torch.Tensor:
        """As many windows as the calibration has, sampled from the float model itself
        (``lowbit quantize --calib-generated``: temperature 1 from BOS, seed 0); made once, kept in
        the work directory with the seconds they took."""
        from safetensors.torch import load_file, save_file

        from lowbit.pipeline.calibration import generated_windows, generation_start_id

        n, seqlen = self.calib.shape
        path = self.setup.work / f"generated-{n}x{seqlen}.safetensors"
        if not path.is_file():
            start = time.perf_counter()
            ids = generated_windows(self.reference, n, seqlen, start_id=generation_start_id(self.tokenizer), seed=0)
            partial = path.with_name(path.name + ".partial")  # an interrupted run leaves nothing that looks done
            save_file({"input_ids": ids}, str(partial), metadata={"seconds": f"{time.perf_counter() - start:.1f}"})
            partial.rename(path)
        return load_file(str(path))["input_ids"]

    def part_lowbit(self) -> None:
        import lowbit
        from lowbit.pipeline.holdout import HoldOut, MethodChoice
        from lowbit.pipeline.recipe import Recipe
        from lowbit.scheme import QuantScheme
        from lowbit.methods.gptq import GPTQConfig

        damps = [float(d) for d in self.args.damps.split(",") if d]
        damp_candidates = tuple(MethodChoice("gptq", GPTQConfig(damp=d)) for d in damps)
        for name in self.args.schemes.split(","):
            scheme = QuantScheme(**SCHEMES[name])
            rows = {
                "rtn": Recipe(method="rtn", default=scheme),
                "gptq": Recipe(method="gptq", default=scheme),
                f"gptq, held-out choice vs rtn (1 in {self.args.holdout})":
                    Recipe(method="gptq", default=scheme, holdout=HoldOut(self.args.holdout)),
            }
            if damps:
                rows[f"gptq damp {max(damps):g}"] = Recipe(method="gptq", method_config=GPTQConfig(damp=max(damps)),
                                                           default=scheme)
                rows[f"gptq, held-out choice vs rtn + gptq damp {'/'.join(map(str, damps))} "
                     f"(1 in {self.args.holdout})"] = Recipe(method="gptq", default=scheme, holdout=HoldOut(
                         self.args.holdout, (MethodChoice("rtn"), *damp_candidates)))
            half = len(self.calib) // 2
            calibs = {"gptq, half the calibration windows generated by the model": "half",
                      "gptq, every calibration window generated by the model": "all"}
            for label in calibs:
                rows[label] = Recipe(method="gptq", default=scheme)
            for label, recipe in rows.items():
                if self.done("lowbit", name, label) or not self.wanted(label):
                    continue
                calib = None if recipe.method == "rtn" else self.calib
                if label in calibs:
                    generated = self.generated()
                    calib = torch.cat([self.calib[:half], generated[:len(self.calib) - half]]) \
                        if calibs[label] == "half" else generated
                model, _ = lowbit.load(self.args.model)
                start = time.perf_counter()
                report = lowbit.quantize(model, recipe, calibration=calib, progress=False)
                seconds = time.perf_counter() - start
                choices = ""
                if report.chosen:
                    counts = Counter(c.label for c in report.chosen.values())
                    choices = ", ".join(f"{k} x{v}" for k, v in counts.most_common())
                self.save({"part": "lowbit", "scheme": name, "label": label, "seconds": seconds, "choices": choices,
                           **self.evaluate(model)})
                del model

    def part_gguf(self) -> None:
        import lowbit

        for qtype in self.args.gguf_types.split(","):
            rows = {"no calibration": {}, "importance search (--imatrix)": {"imatrix": True},
                    "--gptq": {"gptq": True},
                    f"--gptq --holdout {self.args.holdout}": {"gptq": True, "holdout": self.args.holdout}}
            for label, options in rows.items():
                if self.done("gguf", qtype, label) or not self.wanted(label):
                    continue
                path = self.setup.work / f"ood-{qtype}.gguf"
                start = time.perf_counter()
                report = lowbit.export(self.reference, self.tokenizer, path, to="gguf", overwrite=True, type=qtype,
                                       calibration=self.calib if options else None, progress=False, **options)
                seconds = time.perf_counter() - start
                choices = ""
                if options.get("gptq"):
                    choices = f"gptq x{len(report.gptq)}, search x{len(report.searched)}"
                model, _ = lowbit.load(path, dequantize=True)
                self.save({"part": "gguf", "scheme": qtype, "label": label, "seconds": seconds, "choices": choices,
                           "bytes": report.file_size, **self.evaluate(model)})
                del model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--parts", default="lowbit,gguf")
    ap.add_argument("--schemes", default="int4 g64 asym,int3 g64 asym", help=f"of {', '.join(SCHEMES)}")
    ap.add_argument("--gguf-types", default="Q4_0,Q3_K_M")
    ap.add_argument("--holdout", type=int, default=4, help="every k-th calibration window is held out")
    ap.add_argument("--damps", default="0.1,1.0", help="GPTQ dampenings added as held-out candidates ('' for none)")
    ap.add_argument("--rows", default="", help="run only the rows with these exact labels, separated by | (a label starting with -- goes as "
                         "--rows=LABEL)")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--ood-windows", type=int, default=16)
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--suffix", default="")
    args = ap.parse_args()
    torch.set_num_threads(1)
    bench = Bench(args)
    for part in args.parts.split(","):
        getattr(bench, f"part_{part}")()


if __name__ == "__main__":
    sys.exit(main())

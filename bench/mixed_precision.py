"""Automatic mixed precision (lowbit.auto) against uniform schemes, at the README protocol.

Parts (``--parts``, each row written as it finishes; ``--resume`` keeps the rows already in the
results file and skips them):

- ``proxy``: the sensitivity proxy against measured KL, one tensor at a time: every linear of a few
  blocks (``--proxy-blocks``) quantized alone (RTN, ``--proxy-scheme``), KL on ``--proxy-windows``
  windows; Spearman rank correlation of the measured KL with the allocator's proxy (Fisher-weighted,
  diagonal Hessian), with the same proxy on the full Hessian, and with the unweighted proxy; and
  whether the errors add up as the knapsack assumes: all those tensors quantized together against
  the sum of their one-at-a-time KLs.
- ``gptq_proxy``: the GPTQ-aware proxy (how much of each tensor's RTN error GPTQ's error feedback
  takes up, ``gptq_column_weights``) against the cut measured on held-out windows, every linear of
  ``--proxy-blocks``; Spearman rank correlation for Hessians of 4, 8 and 16 windows.
- ``bpw``: the block linears under ``--budgets`` bits per weight (LM head float, as the README
  tables count), the final quantization by each of ``--methods``; uniform lowbit schemes at or under
  those budgets beside them (same method, same windows).
- ``size``: the whole checkpoint at most ``--size`` (default llama.cpp's Q4_K_M file of SmolLM2,
  100.57 MiB), the tied LM head among the tensors chosen for; bytes on disk measured.
- ``gguf``: GGUF files at most the size of lowbit's own Q3_K_M / Q4_K_M files (``--gguf-mixes``),
  per-tensor types chosen by the allocator, GPTQ onto the block grids; scored by llama.cpp
  (llama-cpp-python) against llama.cpp running the F32 file.

Every row has in-domain KL (WikiText-2 raw test, first ``--windows`` windows of 512) and, except the
proxy rows, out-of-domain KL on ``--ood-windows`` windows of Python's standard library source
(``/usr/lib/python3.*/*.py``, sorted, read at run time, not copied into the repo).
The allocation's proxy reads ``--proxy-samples`` of the calibration windows (the first ones); for a
GPTQ row it weighs the errors as GPTQ leaves them (column ``proxy``: ``gptq``, full Hessians of the
first ``--gptq-proxy-windows``), else by the Hessian's diagonal (``diagonal``).

Run: ``python bench/mixed_precision.py --model smollm2-135m``. Writes
``bench/results/mixed_precision_<model>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
import time
from pathlib import Path

import torch

from lowbit.auto.sensitivity import GPTQ_PROXY_WINDOWS, PROXY_WINDOWS

ROOT = Path(__file__).resolve().parent.parent
UNIFORM = {  # the uniform lowbit schemes compared with each budget (those at or under it)
    "int3 g64 asym": {"bits": 3, "group_size": 64, "symmetric": False},
    "int3 g32 asym": {"bits": 3, "group_size": 32, "symmetric": False},
    "nf4 g64 dq": {"format": "nf4", "group_size": 64, "double_quant": True},
    "nf4 g64": {"format": "nf4", "group_size": 64},
    "int4 g64 asym": {"bits": 4, "group_size": 64, "symmetric": False},
    "int4 g32 asym": {"bits": 4, "group_size": 32, "symmetric": False},
}


def base_method(spec: str) -> str:
    """The recipe method of a ``--methods`` entry: ``"gptq mse"`` is GPTQ."""
    return spec.split()[0]


def proxy_kind(spec: str) -> str:
    """How the allocator weighed the errors for the ``--methods`` entry ``spec``: after GPTQ's error
    feedback (``gptq``) or by the Hessian's diagonal (``diagonal``, every other method)."""
    return "gptq" if base_method(spec) == "gptq" else "diagonal"


def final_recipe(recipe, spec: str):
    """``recipe`` as the ``--methods`` entry ``spec`` quantizes it: ``"M mse"`` gives every scheme of
    the recipe (default and overrides) the ``mse`` observer, each group's range from GPTQ's shrink
    search (the README's ``gptq mse`` rows, lowbit's best at 3 bits); a plain method name leaves it."""
    from dataclasses import replace

    if spec.split()[1:] != ["mse"]:
        if spec.split()[1:]:
            raise SystemExit(f"unknown method entry {spec!r}; e.g. gptq, rtn, 'gptq mse'")
        return recipe
    mse = lambda scheme: None if scheme is None else replace(scheme, observer="mse")  # noqa: E731
    return replace(recipe, default=mse(recipe.default),
                   overrides=tuple(replace(o, scheme=mse(o.scheme)) for o in recipe.overrides))


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    def ranks(x: list[float]) -> list[float]:
        order = sorted(range(len(x)), key=lambda i: x[i])
        r = [0.0] * len(x)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r
    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    return cov / (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5


def ood_windows(tokenizer, n: int, bos_id: int | None) -> torch.Tensor:
    """``n`` windows of 512 tokens of Python's standard library source, files in sorted order."""
    from lowbit.evaluate.text import token_windows

    files = sorted(glob.glob("/usr/lib/python3.*/*.py"))
    if not files:
        raise SystemExit("no Python standard library sources under /usr/lib/python3.*/ for the out-of-domain text")
    text, used = "", 0
    for f in files:
        text += Path(f).read_text(encoding="utf-8", errors="replace") + "\n"
        used += 1
        if len(text) > n * 512 * 6:
            break
    return token_windows(text, tokenizer, 512 - (bos_id is not None), n)


def domains_setup(script: str, args: argparse.Namespace):
    """``(bench_setup, calibration ids, out-of-domain windows)`` for ``args.model``: the setup of
    ``--calib-samples`` and ``--windows`` in-domain windows, and ``--ood-windows`` of Python source."""
    from bench_setup import bench_setup
    from safetensors.torch import load_file

    setup = bench_setup(script, args.model, args.calib_samples, args.windows)
    calib = load_file(str(setup.calib_path))["input_ids"]
    return setup, calib, ood_windows(setup.tokenizer, args.ood_windows, setup.bos_id)


def evaluate_in_and_out(model, setup, ood: torch.Tensor, *, progress: bool = True) -> dict:
    """Perplexity, KL and top-1 of ``model`` against ``setup.reference`` on the in-domain windows and
    (``*_ood``) on ``ood``. Through ``float_view``: each quantized layer as ``nn.Linear`` over its
    dequantized weight, the reference path's own computation done once instead of on every forward
    (same logits, float speed)."""
    from lowbit.evaluate.perplexity import evaluate_windows
    from lowbit.nn.float_view import float_view

    bos = setup.bos_id
    with float_view(model):
        ind = evaluate_windows(model, setup.windows, bos_id=bos, reference=setup.reference,
                               progress=progress).to_dict()
        out = evaluate_windows(model, ood, bos_id=bos, reference=setup.reference, progress=progress).to_dict()
    return {"ppl": ind["ppl"], "kld": ind["kld"], "top1": ind["top1"], "ppl_ood": out["ppl"], "kld_ood": out["kld"],
            "top1_ood": out["top1"]}


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.setup, self.calib, self.ood = domains_setup("bench/mixed_precision.py", args)
        self.reference, self.tokenizer = self.setup.reference, self.setup.tokenizer
        self.out = ROOT / "bench" / "results" / f"mixed_precision_{self.setup.name}{args.suffix}.json"
        self.rows: list[dict] = []
        self.extra: dict = {}
        if args.resume and self.out.is_file():
            data = json.loads(self.out.read_text())
            self.rows, self.extra = data["rows"], data.get("extra", {})
        self._tables: dict[str, dict] = {}
        self.table_seconds: dict[str, float] = {}

    def done(self, part: str, label: str, method: str) -> bool:
        return any((r["part"], r["label"], r["method"]) == (part, label, method) for r in self.rows)

    def save(self, row: dict) -> None:
        from bench_results import write_results

        self.rows = [r for r in self.rows if (r["part"], r["label"], r["method"]) != (row["part"], row["label"],
                                                                                     row["method"])] + [row]
        print(json.dumps(row), flush=True)
        meta = {**self.setup.meta, "ood": f"{self.args.ood_windows}x512 tokens of /usr/lib/python3.*/*.py (sorted)",
                "proxy_samples": self.args.proxy_samples}
        write_results(self.out, {"meta": meta, "rows": self.rows, "extra": self.extra}, self.markdown(meta))

    def markdown(self, meta: dict) -> list[str]:
        lines = [f"# Mixed precision, {meta['model']}", "", f"`{meta['command']}` ({meta['date']}); in-domain: "
                 f"WikiText-2 raw test {meta['windows']}x512; out-of-domain: {meta['ood']}; calibration "
                 f"{meta['calibration']}, proxy from its first {meta['proxy_samples']} windows.", "",
                 "| part | row | method | proxy | bits/weight | MiB | ppl | KL | top-1 | KL out of domain | allocation s | "
                 "quantize s | schemes |", "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in self.rows:
            if r["part"] in ("proxy", "gptq_proxy"):
                continue
            f = lambda k, fmt: format(r[k], fmt) if r.get(k) is not None else "-"  # noqa: E731
            allocated = r.get("schemes", "uniform") != "uniform"
            proxy = r.get("proxy", "diagonal") if allocated else "-"  # rows before the GPTQ proxy have no field
            lines.append(f"| {r['part']} | {r['label']} | {r['method']} | {proxy} | {f('bpw', '.3f')} | "
                         f"{r['bytes'] / 2**20 if r.get('bytes') else 0:.2f} | {f('ppl', '.3f')} | {f('kld', '.4f')} | "
                         f"{f('top1', '.3f')} | {f('kld_ood', '.4f')} | {f('allocation_seconds', '.1f')} | "
                         f"{f('quantize_seconds', '.1f')} | {r.get('schemes', '')} |")
        proxy = [r for r in self.rows if r["part"] == "proxy"]
        if proxy:
            lines += ["", "Proxy against one-tensor-at-a-time KL:", "",
                      "| tensor | measured KL | Fisher-weighted proxy | unweighted |", "|---|---:|---:|---:|"]
            lines += [f"| {r['label']} | {r['kld']:.5f} | {r['proxy']:.4g} | {r['raw_proxy']:.4g} |" for r in proxy]
            for k, v in self.extra.get("spearman", {}).items():
                lines.append(f"\nSpearman rank correlation, measured KL vs {k}: {v:.3f} ({len(proxy)} tensors)")
            add = self.extra.get("additivity")
            if add:
                lines.append(f"\nAdditivity: the {add['tensors']} tensors quantized together give KL "
                             f"{add['all_together_kl']:.5f}; their one-at-a-time KLs sum to "
                             f"{add['sum_of_one_tensor_kl']:.5f} (ratio {add['all_together_kl'] / add['sum_of_one_tensor_kl']:.3f})")
        cuts = [r for r in self.rows if r["part"] == "gptq_proxy"]
        if cuts:
            ks = list(cuts[0]["predicted_cut"])
            lines += ["", f"GPTQ's cut of RTN's error (GPTQ error / RTN error on held-out windows, {cuts[0]['scheme']}, "
                      f"GPTQ fitted on {self.args.gptq_fit_windows} windows) against the GPTQ proxy's prediction "
                      "from the first k calibration windows:", "",
                      "| tensor | measured | " + " | ".join(f"predicted, k={k}" for k in ks) + " |",
                      "|---|---:|" + "---:|" * len(ks)]
            lines += [f"| {r['label']} | {r['measured_cut']:.3f} | " + " | ".join(f"{r['predicted_cut'][k]:.3f}" for k in ks)
                      + " |" for r in cuts]
            for k, v in self.extra.get("gptq_proxy_spearman", {}).items():
                lines.append(f"\nSpearman rank correlation, measured vs predicted cut, k={k}: {v:.3f} ({len(cuts)} tensors)")
        return lines

    def proxy_label(self, spec: str) -> str:
        """``proxy_kind`` with the GPTQ proxy's window count: ``gptq 8`` or ``diagonal``."""
        kind = proxy_kind(spec)
        return f"{kind} {self.args.gptq_proxy_windows}" if kind == "gptq" else kind

    def table(self, method: str = "rtn"):
        """Sensitivities of the block linears and the head as ``method`` (``rtn`` or ``gptq``) leaves
        the errors, measured once per method (its seconds recorded)."""
        if method not in self._tables:
            from lowbit.auto.allocate import _head_name, block_linears
            from lowbit.auto.candidates import HEAD_CANDIDATES, LOWBIT_CANDIDATES
            from lowbit.auto.sensitivity import measure_sensitivity

            from lowbit.auto.sensitivity import Option, TensorSensitivity

            head = _head_name(self.reference)
            names = [*block_linears(self.reference), head]
            kind = proxy_kind(method)
            windows = f"-{self.args.gptq_proxy_windows}" if kind == "gptq" else ""
            cache = self.setup.work / f"sensitivity-{kind}-{self.args.proxy_samples}{windows}.json"
            by_name = {c.name: c for c in [*LOWBIT_CANDIDATES, *HEAD_CANDIDATES]}
            if cache.is_file():  # a resumed run reuses the measured table and its time
                data = json.loads(cache.read_text())
                self.table_seconds[method] = data["seconds"]
                self._tables[method] = {t["name"]: TensorSensitivity(t["name"], tuple(t["shape"]), [
                    Option(by_name[o[0]], *o[1:]) for o in t["options"]], t["skipped"]) for t in data["tensors"]}
                return self._tables[method]
            start = time.perf_counter()
            self._tables[method] = measure_sensitivity(
                self.reference, self.calib, lambda n: HEAD_CANDIDATES if n == head else LOWBIT_CANDIDATES, names,
                windows=self.args.proxy_samples, method=method, gptq_windows=self.args.gptq_proxy_windows)
            self.table_seconds[method] = time.perf_counter() - start
            cache.write_text(json.dumps({"seconds": self.table_seconds[method], "tensors": [
                {"name": t.name, "shape": list(t.shape), "skipped": t.skipped,
                 "options": [[o.candidate.name, o.bits, o.error, o.raw_error] for o in t.options]}
                for t in self._tables[method].values()]}))
        return self._tables[method]

    def evaluate(self, model) -> dict:
        return evaluate_in_and_out(model, self.setup, self.ood)

    def quantized(self, recipe) -> tuple[torch.nn.Module, float]:
        import lowbit
        from lowbit.api import needs_calibration

        model, _ = lowbit.load(self.args.model)
        start = time.perf_counter()
        lowbit.quantize(model, recipe, calibration=self.calib if needs_calibration(recipe) else None)
        return model, time.perf_counter() - start

    def part_proxy(self) -> None:
        """The proxy of ``--proxy-scheme`` from the allocation's own sensitivity table (same windows,
        same Fisher), against KL measured with that one tensor quantized."""
        from lowbit.auto.candidates import Candidate
        from lowbit.scheme import QuantScheme

        candidate = Candidate.of_scheme(QuantScheme(**UNIFORM[self.args.proxy_scheme]))
        blocks = [int(b) for b in self.args.proxy_blocks.split(",")]
        table = self.table()
        names = [n for n in table if any(n.startswith(f"model.layers.{b}.") for b in blocks)]
        windows = self.setup.windows[:self.args.proxy_windows]
        for name in names:
            if self.done("proxy", name, "rtn"):
                continue
            option = next(o for o in table[name].options if o.candidate.name == candidate.name)
            self.save({"part": "proxy", "label": name, "method": "rtn", "scheme": candidate.name,
                       "kld": self._swapped_kl([name], candidate, windows), "proxy": option.error,
                       "raw_proxy": option.raw_error})
        proxy = [r for r in self.rows if r["part"] == "proxy"]
        measured = [r["kld"] for r in proxy]
        full = self._full_hessian_proxy([r["label"] for r in proxy], candidate)
        self.extra["spearman"] = {
            "Fisher-weighted proxy (diagonal Hessian, the allocator's)": spearman(measured, [r["proxy"] for r in proxy]),
            "Fisher-weighted tr(dW H dW^T) (full Hessian, same windows)": spearman(measured, full),
            "unweighted diagonal proxy": spearman(measured, [r["raw_proxy"] for r in proxy])}
        if "additivity" not in self.extra:  # the knapsack adds the tensors' errors: does the KL add up?
            self.extra["additivity"] = {"tensors": len(proxy), "sum_of_one_tensor_kl": sum(measured),
                                        "all_together_kl": self._swapped_kl([r["label"] for r in proxy], candidate,
                                                                            windows)}
        self.save(proxy[-1])

    def part_gptq_proxy(self) -> None:
        """How much GPTQ cuts RTN's error in each linear of ``--proxy-blocks`` (``--proxy-scheme``,
        GPTQ with mse ranges on the Hessians of the first ``--gptq-fit-windows`` calibration windows),
        measured as ``tr(dW H dW^T)`` on held-out text (the first ``--proxy-windows`` in-domain test
        windows), against the cut the allocator's GPTQ proxy predicts from the first 4, 8 and 16
        windows (``gptq_column_weights``); Spearman rank correlation per window count."""
        from dataclasses import replace

        from lowbit.auto.allocate import block_linears
        from lowbit.auto.candidates import Candidate
        from lowbit.auto.sensitivity import gptq_column_weights, input_hessians
        from lowbit.methods.gptq import gptq_quantize
        from lowbit.scheme import QuantScheme

        scheme = QuantScheme(**UNIFORM[self.args.proxy_scheme])
        candidate = Candidate.of_scheme(scheme)
        blocks = [int(b) for b in self.args.proxy_blocks.split(",")]
        names = [n for n in block_linears(self.reference) if any(n.startswith(f"model.layers.{b}.") for b in blocks)]
        names = [n for n in names if not self.done("gptq_proxy", n, "gptq mse")]
        if names:
            def hessians(windows: torch.Tensor) -> dict[str, torch.Tensor]:
                return {n: H for readers, H in input_hessians(self.reference, windows, names) for n in readers}

            fit = hessians(self.calib[:self.args.gptq_fit_windows])
            held = hessians(self.setup.windows[:self.args.proxy_windows])
            few = {k: hessians(self.calib[:k]) for k in (4, 8, 16)}
            for n in names:
                weight = self.reference.get_submodule(n).weight.detach().float()
                rtn = candidate.round_trip(weight) - weight
                gptq = gptq_quantize(weight, fit[n], replace(scheme, observer="mse"), layer=n).dequantize() - weight
                error = lambda d: float(((d @ held[n]) * d).sum(dtype=torch.float64))  # noqa: E731
                column = rtn.pow(2).sum(0)
                predicted = {str(k): float((column * gptq_column_weights(H[n])).sum() / (column * H[n].diagonal()).sum())
                             for k, H in few.items()}
                self.save({"part": "gptq_proxy", "label": n, "method": "gptq mse", "scheme": candidate.name,
                           "measured_cut": error(gptq) / error(rtn), "predicted_cut": predicted})
        rows = [r for r in self.rows if r["part"] == "gptq_proxy"]
        self.extra["gptq_proxy_spearman"] = {k: spearman([r["measured_cut"] for r in rows],
                                                         [r["predicted_cut"][k] for r in rows])
                                             for k in rows[0]["predicted_cut"]}
        self.save(rows[-1])

    def _full_hessian_proxy(self, names: list[str], candidate) -> list[float]:
        """The proxy with the full input Hessian ``H = 2 X^T X / n`` instead of its diagonal, on the
        allocator's own windows and Fisher: what the diagonal gives up, measured."""
        from lowbit.auto.sensitivity import input_hessians, loss_statistics

        windows = self.calib[:self.args.proxy_samples]
        stats = loss_statistics(self.reference, windows, names)
        hessians = {n: H for readers, H in input_hessians(self.reference, windows, names) for n in readers}
        out = []
        for n in names:
            weight = self.reference.get_submodule(n).weight.detach().float()
            delta = candidate.round_trip(weight) - weight
            H = hessians[n]
            out.append(float((((delta @ H) * delta).sum(1, dtype=torch.float64) * stats[n].fisher.double()).sum()))
        return out

    def _swapped_kl(self, names: list[str], candidate, windows: torch.Tensor) -> float:
        """KL(float || model with only ``names`` quantized by ``candidate``) per predicted token: the
        float model's log-probabilities are computed once per run, then the model runs with twins of
        those linears swapped in (no second model)."""
        from lowbit.evaluate.perplexity import _forward_logits, _model_inputs

        if getattr(self, "_ref_logp", None) is None:
            with torch.inference_mode():
                self._ref_logp = [torch.log_softmax(_forward_logits(
                    self.reference, _model_inputs(w[None], self.setup.bos_id)[0])[:, :-1].float(), -1) for w in windows]
        swaps = []  # (parent, attribute, float linear, quantized twin)
        for name in names:
            module = self.reference.get_submodule(name)
            twin = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            twin.weight = torch.nn.Parameter(candidate.round_trip(module.weight.data), requires_grad=False)
            if module.bias is not None:
                twin.bias = module.bias
            parent_name, _, attr = name.rpartition(".")
            swaps.append((self.reference.get_submodule(parent_name), attr, module, twin))
        total, tokens = 0.0, 0
        with torch.inference_mode():
            for w, ref in zip(windows, self._ref_logp):
                inputs, _ = _model_inputs(w[None], self.setup.bos_id)
                try:
                    for parent, attr, _, twin in swaps:
                        setattr(parent, attr, twin)
                    q = torch.log_softmax(_forward_logits(self.reference, inputs)[:, :-1].float(), -1)
                finally:
                    for parent, attr, module, _ in swaps:
                        setattr(parent, attr, module)
                total += float((ref.exp() * (ref - q)).sum())
                tokens += ref.shape[0] * ref.shape[1]
        return total / tokens

    def part_bpw(self) -> None:
        from lowbit.auto import Budget, allocate
        from lowbit.evaluate.size import size_report
        from lowbit.pipeline.recipe import Recipe
        from lowbit.scheme import QuantScheme

        for method in self.args.methods.split(","):
            for budget in [float(b) for b in self.args.budgets.split(",") if b]:
                label = f"auto {budget:g} bpw"
                if not self.done("bpw", label, method):
                    table = self.table(base_method(method))
                    start = time.perf_counter()
                    allocation = allocate(self.reference, None, Budget(bpw=budget), method=base_method(method),
                                          table=table, progress=False)
                    solve = time.perf_counter() - start
                    model, seconds = self.quantized(final_recipe(allocation.recipe, method))
                    self.save({"part": "bpw", "label": label, "method": method, "bpw": size_report(model).bpw,
                               "allocation_seconds": self.table_seconds[base_method(method)] + solve,
                               "quantize_seconds": seconds, "proxy": self.proxy_label(method),
                               "schemes": ", ".join(f"{n} x{k}" for n, k in allocation.counts().items()),
                               **self.evaluate(model)})
                    del model
            for name in [u for u in self.args.uniform.split(",") if u]:
                scheme = QuantScheme(**UNIFORM[name])
                if self.done("bpw", name, method):
                    continue
                model, seconds = self.quantized(final_recipe(Recipe(method=base_method(method), default=scheme), method))
                bpw = size_report(model).bpw
                if bpw > self.args.uniform_max:
                    continue
                self.save({"part": "bpw", "label": name, "method": method, "bpw": bpw, "quantize_seconds": seconds,
                           "schemes": "uniform", **self.evaluate(model)})
                del model

    def part_size(self) -> None:
        import tempfile

        import lowbit
        from lowbit.auto import Budget, allocate, parse_size

        size = parse_size(self.args.size)
        for method in self.args.methods.split(","):
            label = f"auto checkpoint <= {self.args.size}"
            if self.done("size", label, method):
                continue
            with tempfile.TemporaryDirectory() as tmp:
                self.tokenizer.save_pretrained(tmp)
                extra = sum(f.stat().st_size for f in Path(tmp).iterdir() if f.is_file())
            table = self.table(base_method(method))
            start = time.perf_counter()
            allocation = allocate(self.reference, None, Budget(size_bytes=size), method=base_method(method),
                                  table=table, extra_bytes=extra, progress=False)
            solve = time.perf_counter() - start
            model, seconds = self.quantized(final_recipe(allocation.recipe, method))
            out = self.setup.work / f"auto-size-{method}"
            lowbit.save_quantized(model, out, recipe=allocation.recipe, tokenizer=self.tokenizer, overwrite=True,
                                  allocation=allocation.to_dict())
            disk = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
            self.save({"part": "size", "label": label, "method": method, "bpw": allocation.bpw, "bytes": disk,
                       "target_bytes": size, "allocation_seconds": self.table_seconds[base_method(method)] + solve,
                       "proxy": self.proxy_label(method),
                       "quantize_seconds": seconds,
                       "schemes": ", ".join(f"{n} x{k}" for n, k in allocation.counts().items()),
                       **self.evaluate(model)})
            del model

    def part_gguf(self) -> None:
        import lowbit
        from lowbit.auto import allocate_gguf
        from lowbit.gguf.export import export_gguf
        from lowbit.gguf.llama_cpp import llama_cpp_logits

        f32 = self.setup.work / "lowbit-F32.gguf"
        if not f32.is_file():
            export_gguf(self.reference, self.tokenizer, f32, "F32")
        bos = self.setup.bos_id
        for mix in self.args.gguf_mixes.split(","):
            label = f"auto gguf <= lowbit {mix} size, {self.proxy_label('gptq')} proxy"
            if self.done("gguf", label, "gptq"):
                continue
            start = time.perf_counter()
            allocation = allocate_gguf(self.reference, self.tokenizer, self.calib[:max(
                self.args.proxy_samples, self.args.gptq_proxy_windows)], mix, method="gptq",
                windows=self.args.proxy_samples, gptq_windows=self.args.gptq_proxy_windows)
            alloc_seconds = time.perf_counter() - start
            path = self.setup.work / f"auto-{mix}.gguf"
            start = time.perf_counter()
            report = lowbit.export(self.reference, self.tokenizer, path, to="gguf", overwrite=True, type=mix,
                                   gptq=True, tensor_types=allocation.gguf_types, calibration=self.calib)
            seconds = time.perf_counter() - start
            scores = {}
            for key, windows in (("", self.setup.windows), ("_ood", self.ood)):
                inputs = [([bos] if bos is not None else []) + w.tolist() for w in windows]
                total, agree, nll, tokens = 0.0, 0, 0.0, 0
                runs = (llama_cpp_logits(p, inputs, n_threads=1) for p in (f32, path))  # ggml spins on shared cores
                for ref, q, ids in zip(*runs, inputs):
                    ref_l = torch.log_softmax(torch.from_numpy(ref[:-1]).float(), -1)
                    q_l = torch.log_softmax(torch.from_numpy(q[:-1]).float(), -1)
                    target = torch.tensor(ids[1:])
                    total += float((ref_l.exp() * (ref_l - q_l)).sum())
                    agree += int((ref_l.argmax(-1) == q_l.argmax(-1)).sum())
                    nll -= float(q_l.gather(1, target[:, None]).sum())
                    tokens += target.numel()
                scores.update({f"kld{key}": total / tokens, f"top1{key}": agree / tokens,
                               f"ppl{key}": float(torch.tensor(nll / tokens).exp())})
            self.save({"part": "gguf", "label": label, "method": "gptq", "bpw": report.bits_per_weight,
                       "bytes": report.file_size, "target_bytes": allocation.budget.size_bytes,
                       "allocation_seconds": alloc_seconds, "quantize_seconds": seconds,
                       "proxy": self.proxy_label("gptq"),
                       "schemes": ", ".join(f"{n} x{k}" for n, k in allocation.counts().items()), **scores})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--parts", default="proxy,gptq_proxy,bpw,size,gguf")
    ap.add_argument("--methods", default="rtn",
                    help="final quantization methods, comma-separated (rtn, gptq, 'gptq mse': GPTQ, mse group ranges)")
    ap.add_argument("--budgets", default="3,3.5,4,4.5")
    ap.add_argument("--uniform", default="int3 g64 asym,nf4 g64 dq,int4 g64 asym",
                    help=f"uniform schemes beside the budgets, comma-separated; of {', '.join(UNIFORM)}")
    ap.add_argument("--uniform-max", type=float, default=4.5, help="uniform schemes above this bpw are left out")
    ap.add_argument("--size", default="100.57MiB")
    ap.add_argument("--gguf-mixes", default="Q3_K_M,Q4_K_M")
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--ood-windows", type=int, default=16)
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--proxy-samples", type=int, default=PROXY_WINDOWS,
                    help="calibration windows of the allocation's forward and backward pass")
    ap.add_argument("--proxy-blocks", default="0,15,29")
    ap.add_argument("--proxy-scheme", default="int3 g64 asym", choices=list(UNIFORM))
    ap.add_argument("--proxy-windows", type=int, default=8)
    ap.add_argument("--gptq-proxy-windows", type=int, default=GPTQ_PROXY_WINDOWS,
                    help="windows of the GPTQ-aware proxy's Hessians (allocations for a GPTQ method)")
    ap.add_argument("--gptq-fit-windows", type=int, default=32,
                    help="part gptq_proxy: calibration windows of the Hessians GPTQ is fitted on")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--suffix", default="", help="results file mixed_precision_<model><suffix>.json (runs in parallel)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    bench = Bench(args)
    for part in args.parts.split(","):
        getattr(bench, f"part_{part}")()


if __name__ == "__main__":
    sys.exit(main())

"""The fault suite's fixtures: a mini Llama and what lowbit makes of it, and ``probe``, which runs one
command in-process through ``lowbit.cli.main`` and checks the contract of issue 16:

- the exit status is the expected one (2 for bad input, 0 where the input is actually fine);
- a failure is one line on stderr and no traceback;
- a failed run leaves nothing at its output names (no output, no partial, no lock file), and a
  run that succeeded left an output that verifies;
- files placed beside the output to stand for the user's data are still there.

Every probe and fuzzing example is counted in ``TALLY``; with ``LOWBIT_FAULT_REPORT=FILE`` the
counts are written there as JSON when the session ends (the table issue 16 asks for).
"""

from __future__ import annotations

import json
import os
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

TALLY: Counter[str] = Counter()
# UTF-8 text with multi-byte characters, so truncations and bit flips can break the encoding.
TEXT = "The tower is 324 metres tall — about the height of an 81-storey building; café, naïve, 東京. " * 40


@pytest.fixture(scope="session", autouse=True)
def fault_report():
    yield TALLY
    target = os.environ.get("LOWBIT_FAULT_REPORT")
    if target:
        Path(target).write_text(json.dumps(dict(sorted(TALLY.items())), indent=2) + "\n")


@pytest.fixture(scope="session")
def mini_llama_dir(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-layer random Llama (hidden 64, context 128) with the tiny model's tokenizer: small enough
    that loading it is ~10 ms, so hundreds of probes and fuzzing examples fit in seconds."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=len(tokenizer), max_position_embeddings=128,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("mini_llama")
    LlamaForCausalLM(config).eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def mini_checkpoint(mini_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The mini Llama quantized by lowbit (int4 g32): a checkpoint with a manifest."""
    from lowbit.cli import main

    out = tmp_path_factory.mktemp("mini_ckpt") / "q"
    assert main(["quantize", str(mini_llama_dir), "-o", str(out), "--group-size", "32", "--quiet"]) == 0
    return out


@pytest.fixture(scope="session")
def mini_gguf(mini_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The mini Llama exported to GGUF (Q8_0), with its tokenizer in the metadata."""
    from lowbit.cli import main

    out = tmp_path_factory.mktemp("mini_gguf") / "mini.gguf"
    assert main(["export-gguf", str(mini_llama_dir), "-o", str(out), "--type", "Q8_0", "--quiet"]) == 0
    return out


@pytest.fixture(scope="session")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


@dataclass
class Outcome:
    """What one in-process command did."""

    rc: int | None  # None: an exception escaped main
    out: str
    err: str
    escaped: str = ""  # the traceback of an exception that escaped main
    lines: list[str] = field(default_factory=list)  # stderr's non-empty lines


class Prober:
    """Runs commands through ``lowbit.cli.main`` and checks each against the contract (module docstring)."""

    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self.capsys = capsys

    def run(self, argv: list[str]) -> Outcome:
        from lowbit.cli import main

        self.capsys.readouterr()
        try:
            rc, escaped = main(argv), ""
        except BaseException:  # noqa: BLE001 - an escaped exception is what the probe detects
            rc, escaped = None, traceback.format_exc()
        captured = self.capsys.readouterr()
        return Outcome(rc, captured.out, captured.err, escaped,
                       [line for line in captured.err.splitlines() if line.strip()])

    def __call__(self, argv: list[str], expect: set[int] | int = 2, outputs: tuple[Path, ...] = (),
                 keep: tuple[Path, ...] = ()) -> Outcome:
        """Run ``argv`` and assert the contract; ``expect`` is the allowed exit statuses, ``outputs``
        the paths the command would write, ``keep`` files that must survive it (the user's data)."""
        expect = {expect} if isinstance(expect, int) else expect
        kept = {p: p.read_bytes() for p in keep}
        o = self.run([str(a) for a in argv])
        TALLY["probes"] += 1
        traceback_shown = bool(o.escaped) or "Traceback" in o.err
        TALLY["tracebacks"] += traceback_shown
        TALLY["wrong_exit_codes"] += not traceback_shown and o.rc not in expect
        TALLY["one_line_errors"] += o.rc == 2 and len(o.lines) == 1
        TALLY["multi_line_errors"] += o.rc == 2 and len(o.lines) != 1
        TALLY["exit_0"] += o.rc == 0
        lost = [p for p, data in kept.items() if not p.is_file() or p.read_bytes() != data]
        TALLY["data_lost"] += bool(lost)
        left = [p for p in outputs for q in _traces(p)] if o.rc != 0 else []
        TALLY["half_written_outputs"] += bool(left)
        wrong = _silently_wrong(o, outputs) if o.rc == 0 else None
        TALLY["silent_wrong_results"] += wrong is not None
        assert not traceback_shown, f"{argv}: traceback\n{o.escaped or o.err}"
        assert o.rc in expect, f"{argv}: exit {o.rc}, expected {sorted(expect)}; stderr: {o.err}"
        if o.rc == 2:
            assert len(o.lines) == 1, f"{argv}: stderr is not one line:\n{o.err}"
        assert not lost, f"{argv}: lost {lost}"
        assert not left, f"{argv}: failed but left {[q for p in outputs for q in _traces(p)]}"
        assert wrong is None, f"{argv}: {wrong}"
        return o


def _traces(path: Path) -> list[Path]:
    """What a run left at ``path``'s name: the output itself, its partials, its lock file."""
    found = [path] if path.exists() or path.is_symlink() else []
    if path.parent.is_dir():
        found += [p for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.")]
    return found


def _silently_wrong(o: Outcome, outputs: tuple[Path, ...]) -> str | None:
    """Why a run that exited 0 is wrong all the same, or None: JSON output that is not strict JSON
    or reports a non-finite perplexity, an output that is missing or does not verify."""
    from lowbit.io.checkpoint import is_lowbit_checkpoint, read_quantization_config

    text = o.out.strip()
    if text.startswith("{"):
        try:
            report = json.loads(text, parse_constant=_refuse_constant)
        except ValueError as e:
            return f"stdout is not strict JSON ({e})"
        if "ppl" in report and report["ppl"] is None:
            return "perplexity is not finite"
    for path in outputs:
        if not path.exists():
            return f"exit 0 but {path} was not written"
        if path.is_dir() and is_lowbit_checkpoint(path):
            read_quantization_config(path)  # raises when the manifest does not match
    return None


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


@pytest.fixture
def probe(capsys: pytest.CaptureFixture[str]) -> Prober:
    return Prober(capsys)



def check_refusal(call, *args, **kwargs) -> BaseException | None:
    """Call ``call``; it must return or raise one of lowbit's one-line errors (an error the CLI
    boundary shows as one line: ``lowbit.boundary.is_user_error``, with a one-line message). Returns
    what it raised (None when it returned); counted in ``TALLY`` as an API probe."""
    from lowbit.boundary import is_user_error

    TALLY["api_probes"] += 1
    try:
        call(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - which exception it is, is what is checked
        one_line = is_user_error(e) and "\n" not in str(e).strip()
        TALLY["api_one_line_errors"] += one_line
        TALLY["api_other_exceptions"] += not one_line
        assert one_line, f"{call.__name__}{args}: {type(e).__name__} that is not one of lowbit's one-line errors: {e}"
        return e
    return None


@pytest.fixture
def refusal():
    return check_refusal

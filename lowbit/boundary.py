"""The command line's one error boundary: what the user can fix is one line, everything else a traceback.

Every ``lowbit`` command runs inside ``run_command``, so no failure escapes in another shape:

- the user's fault (exit ``EXIT_USER``, one line ``lowbit CMD: error: ...`` on stderr): what the
  system refused (``OSError``: a full disk, a read-only or unwritable path, a missing file), a file
  that does not parse (safetensors, JSON, YAML, text that is not UTF-8), and the ``ValueError``,
  ``TypeError`` and ``RuntimeError`` that lowbit's own validation raises;
- Ctrl-C (exit ``EXIT_INTERRUPTED``, one line): outputs are staged (``lowbit.io.output``), so an
  interrupted run leaves nothing at the output name and there is nothing to show;
- anything else is a bug in lowbit or below it, and keeps its traceback. That includes a
  ``ValueError`` raised deep inside a library: the input that causes it is one lowbit should have
  refused itself, with a line naming the file or option, so the traceback says where to add the check.

Progress bars still open when a command fails are erased first (``clear_progress_bars``), so
the one line is the last thing printed and starts a line of its own.

Argument mistakes go the same way: ``OneLineParser`` prints one line with a compact usage instead
of argparse's full usage block.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import yaml
from safetensors import SafetensorError

EXIT_USER = 2  # argparse's status for a usage error; every user error shares it
EXIT_INTERRUPTED = 130  # 128 + SIGINT: what a shell reports for a process Ctrl-C ended

# The input's fault wherever they are raised: the system refused, or a file did not parse.
ENVIRONMENT_ERRORS = (OSError, SafetensorError, yaml.YAMLError, UnicodeDecodeError, json.JSONDecodeError)
# The input's fault when lowbit raised them (its validation); raised inside another library, a bug.
VALIDATION_ERRORS = (ValueError, TypeError, RuntimeError)

_PACKAGE = Path(__file__).resolve().parent


def run_command(command: Callable[[], int], name: str) -> int:
    """Run ``command`` (a CLI command with its parsed arguments bound) and return its exit status,
    turning an expected failure into one line on stderr (``is_user_error``) and Ctrl-C into exit 130.
    An unexpected exception propagates with its traceback."""
    try:
        return command()
    except KeyboardInterrupt:
        clear_progress_bars()
        print(f"lowbit {name}: interrupted; no output was left half-written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        if not is_user_error(e):
            raise
        clear_progress_bars()
        print(f"lowbit {name}: error: {one_line(e)}", file=sys.stderr)
        return EXIT_USER


def clear_progress_bars() -> None:
    """Erase every progress bar still open, so that the line that follows starts a line of its own
    and stays the last one printed. A loop over ``tqdm(...)`` that an exception left is not closed
    until its generator is collected: its bar stays half-drawn with the cursor behind it (the error
    line would be appended to it), and closing it later redraws it below the error line."""
    from tqdm import tqdm

    for bar in list(tqdm._instances):  # tqdm's registry of open bars, shared by its subclasses
        bar.leave = False  # close() then clears the bar's line instead of drawing it a last time
        bar.close()


def is_user_error(e: BaseException) -> bool:
    """Whether ``e`` is a failure the user can fix (see the module docstring) rather than a bug."""
    if isinstance(e, ENVIRONMENT_ERRORS):
        return True
    return isinstance(e, VALIDATION_ERRORS) and raised_in_lowbit(e)


def one_line(e: BaseException) -> str:
    """``e``'s message as one line: its first non-empty line (libraries add advice after the cause),
    the type's name when it has none, ``path: reason`` for an ``OSError`` that names its file."""
    if isinstance(e, OSError) and e.strerror and e.filename:
        return f"{e.filename}: {e.strerror}"
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


def raised_in_lowbit(e: BaseException) -> bool:
    """Whether the innermost frame of ``e``'s traceback is lowbit's code, i.e. lowbit raised it."""
    tb = e.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(_PACKAGE)


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line: the mistake, a compact usage of the command
    (its positionals and required options) and where the full list is. argparse prints its whole
    usage block first, 20 lines for ``quantize``, which buries the mistake."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (usage: {self.compact_usage()}; {self.prog} -h lists every option)",
              file=sys.stderr)
        self.exit(EXIT_USER)

    def compact_usage(self) -> str:
        """``PROG POSITIONAL... -o OUTPUT [options]``: what every call of the command must give."""
        words = [self.prog]
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                words.append("{" + ",".join(action.choices) + "} ...")
            elif not action.option_strings:
                words.append(action.metavar or action.dest.upper())
            elif action.required:
                words.append(f"{action.option_strings[0]} {action.metavar or action.dest.upper()}")
        return " ".join([*words, "[options]"])

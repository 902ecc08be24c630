"""Every output lowbit writes goes through here: checked, locked, built beside its place, renamed in.

    with reserve_output(out, overwrite=False, needed=n):  # before any slow work: checked, space, locked
        model = ...                                       # load, quantize
        with staged_output(out, overwrite=False, directory=True) as tmp:
            write_into(tmp)                               # renamed to ``out`` when the block ends

The rules, so that no run loses data and no two runs both report success:

- An existing output is replaced only with ``overwrite`` and only when lowbit wrote it (a lowbit
  checkpoint, a QLoRA adapter, a GGUF file) or it is an empty directory, which holds nothing to
  lose; anything else is refused, whatever the flag.
- A command that knows roughly what it will write (``lowbit.io.output_size``) has the output's
  filesystem checked for that much free space first, so a full disk fails before the work too.
- A writer holds an exclusive lock (``flock`` on ``.<name>.lock`` beside the output) until the
  rename, so a second writer to the same output fails at once; a command reserves its outputs
  before its slow work, so a bad or busy output costs nothing.
- The output is built in ``.<name>.partial-<pid>-<random>`` beside it and renamed into place; an
  old output is moved aside under the same kind of name and removed after the rename, so an
  interrupted run leaves only partials, which the next writer removes once their process is dead.
"""

from __future__ import annotations

import _thread
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

ADAPTER_RECORD = "lowbit_base.json"  # lowbit.train.qlora writes it into every adapter directory
ONNX_RECORD = "lowbit_onnx.json"  # lowbit.io.export.onnx writes it into every ONNX directory
EXPORT_RECORD = "lowbit_export.json"  # lowbit.io.export.hf_quantized writes it into GPTQ/AWQ/compressed-tensors directories
GGUF_MAGIC = b"GGUF"
TFLITE_MAGIC = b"TFL3"  # a TFLite flatbuffer's file identifier, at offset 4

# Open lock files of this process, by output path, with how many reservations hold each. A flock
# belongs to an open file, so a nested reservation of the same output (the CLI reserves before its
# work, the writer again around its write) must reuse the file rather than open and lock it anew.
_held: dict[Path, list[int]] = {}
# Ctrl-C while an output is held, remembered: some extensions check for signals inside their own code
# and drop the KeyboardInterrupt it raises, so the job would run on and finish its output; a staged
# output is not moved into place once this is set.
_interrupted = threading.Event()
_previous_sigint = None
_REDELIVERY_DELAY_S = 0.01


def _on_sigint(signum, frame) -> None:
    _interrupted.set()
    if _in_finaliser(frame):
        # Python would drop a KeyboardInterrupt raised here, print it with a traceback and go on with
        # the job; deliver it again in a moment instead, when the finaliser has returned.
        redelivery = threading.Timer(_REDELIVERY_DELAY_S, _thread.interrupt_main)
        redelivery.daemon = True
        redelivery.start()
        return
    signal.default_int_handler(signum, frame)


def _in_finaliser(frame) -> bool:
    """Whether ``frame`` runs inside a ``__del__`` (one the garbage collector calls, such as the
    ``regex`` package's while a tokenizer loads)."""
    while frame is not None:
        if frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


def _watch_sigint(on: bool) -> None:
    """Route SIGINT through ``_on_sigint`` while outputs are held (main thread only: elsewhere Python
    cannot set handlers, and the default one stays)."""
    global _previous_sigint
    if threading.current_thread() is not threading.main_thread():
        return
    if on:
        _interrupted.clear()
        _previous_sigint = signal.signal(signal.SIGINT, _on_sigint)
    elif _previous_sigint is not None:
        signal.signal(signal.SIGINT, _previous_sigint)
        _previous_sigint = None


class OutputError(OSError):
    """The output cannot be written: its directory is not writable, or another process is writing it."""


def check_output(path: str | Path, overwrite: bool) -> None:
    """Refuse an output that cannot or must not be written; checks only, creates nothing.

    The nearest existing directory on the way to ``path`` must be writable; an existing ``path`` is
    accepted only with ``overwrite`` and only when lowbit wrote it (``written_by_lowbit``) or it is
    an empty directory.
    ``reserve_output`` runs this check under the output's lock.

    Raises:
        OutputError: a file stands where a directory on the way must be, or the directory is not
            writable.
        FileExistsError: ``path`` exists and ``overwrite`` is False, or it exists and is not
            something lowbit wrote.
    """
    path = Path(path)
    ancestor = next(p for p in (path.parent, *path.parent.parents) if p.exists() or p == p.parent)
    if not ancestor.is_dir():
        raise OutputError(f"cannot write {path}: {ancestor} is a file, not a directory; choose another -o")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {path}: directory {ancestor} is not writable; choose another -o")
    if not (path.exists() or path.is_symlink()):
        return
    kind = "directory" if path.is_dir() else "file"
    if not overwrite:
        raise FileExistsError(f"output {kind} {path} already exists; choose another path or pass --overwrite")
    if not (written_by_lowbit(path) or _empty_directory(path)):
        raise FileExistsError(f"output {kind} {path} exists and is not a lowbit checkpoint, adapter or GGUF file, "
                              "so --overwrite leaves it alone; choose another -o or remove it yourself")


def check_free_space(path: str | Path, needed: int) -> None:
    """Refuse to write ``needed`` bytes at ``path`` when its filesystem (that of its nearest existing
    directory) has less free space.

    Raises:
        OutputError: one line with the bytes needed, the bytes free and the path.
    """
    path = Path(path)
    existing = next(p for p in (path.parent, *path.parent.parents) if p.is_dir() or p == p.parent)
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise OutputError(f"not enough disk space for {path}: it needs about {needed:,} bytes "
                          f"({needed / 2**20:.1f} MiB), {existing} has {free:,} bytes free "
                          f"({free / 2**20:.1f} MiB); free some space or choose another -o")


def written_by_lowbit(path: str | Path) -> bool:
    """Whether ``path`` is something lowbit writes, the only thing ``overwrite`` may replace: a
    directory whose ``config.json`` has a lowbit ``quantization_config``, a QLoRA adapter directory
    (with ``ADAPTER_RECORD``), an ONNX export directory (with ``ONNX_RECORD``), an exported
    GPTQ/AWQ/compressed-tensors directory (with ``EXPORT_RECORD``), a ``.gguf`` file starting with the
    GGUF magic, or a ``.tflite`` flatbuffer (``TFLITE_MAGIC``)."""
    path = Path(path)
    if path.is_dir():
        if any((path / record).is_file() for record in (ADAPTER_RECORD, ONNX_RECORD, EXPORT_RECORD)):
            return True
        try:
            config = json.loads((path / "config.json").read_text())
        except (OSError, ValueError):  # no config.json, or not JSON: not a checkpoint lowbit wrote
            return False
        qc = config.get("quantization_config") if isinstance(config, dict) else None
        return isinstance(qc, dict) and qc.get("quant_method") == "lowbit"
    if path.is_file() and path.suffix == ".gguf":
        with open(path, "rb") as f:
            return f.read(len(GGUF_MAGIC)) == GGUF_MAGIC
    if path.is_file() and path.suffix == ".tflite":
        with open(path, "rb") as f:
            return f.read(8)[4:] == TFLITE_MAGIC
    return False


def _empty_directory(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and next(path.iterdir(), None) is None


@contextmanager
def reserve_output(path: str | Path, overwrite: bool, needed: int | None = None) -> Iterator[Path]:
    """Hold ``path`` for this process for the block: ``check_output``, ``check_free_space`` for the
    ``needed`` bytes it will take (``lowbit.io.output_size``; None: unknown, not checked), its
    missing parent directories created, its lock taken, stale partials of dead writers removed (one
    log line each). Take it before slow work so that a bad, busy or too large output fails at once.
    Nested reservations of one output in a process share the lock; the lock file goes when the
    outermost ends.

    Raises:
        OutputError: the directory cannot be created or written, has too little free space, or
            another process holds the lock.
        FileExistsError: as ``check_output``.
    """
    path = Path(path)
    check_output(path, overwrite)
    if needed is not None:
        check_free_space(path, needed)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot write {path}: cannot create {path.parent} ({e.strerror}); "
                          "choose another -o") from None
    key = path.parent.resolve() / path.name
    if key in _held:
        _held[key][1] += 1
    else:
        _held[key] = [_lock(path), 1]
        if len(_held) == 1:
            _watch_sigint(True)
    try:
        _remove_stale_partials(path)
        check_output(path, overwrite)  # again under the lock: another writer may have finished meanwhile
        yield path
    finally:
        _held[key][1] -= 1
        if not _held[key][1]:
            _unlock(path, _held.pop(key)[0])
            if not _held:
                _watch_sigint(False)


@contextmanager
def staged_output(path: str | Path, *, overwrite: bool, directory: bool) -> Iterator[Path]:
    """Reserve ``path`` and give the temporary sibling to build it in: a new empty directory when
    ``directory``, else a new empty file. When the block ends normally the sibling replaces ``path``
    (a file over a file in one ``os.replace``; otherwise the old output is moved aside first and
    removed after); when it raises, the sibling is removed and ``path`` is left as it was.

    Raises:
        as ``reserve_output``.
    """
    path = Path(path)
    with reserve_output(path, overwrite):
        prefix = f".{path.name}.partial-{os.getpid()}-"
        if directory:
            tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=path.parent))
            tmp.chmod(0o755)  # mkdtemp makes it private; an output is an ordinary directory
        else:
            fd, name = tempfile.mkstemp(prefix=prefix, dir=path.parent)
            os.close(fd)
            tmp = Path(name)
            tmp.chmod(0o644)
        try:
            yield tmp
            if _interrupted.is_set():  # Ctrl-C that some extension swallowed: the output is not finished
                raise KeyboardInterrupt
            _move_into_place(tmp, path)
        except BaseException:
            _remove(tmp)
            raise


def _lock(path: Path) -> int:
    """Open and lock ``.<name>.lock`` beside ``path``; the open file holds the lock.

    The file is removed when the lock is given up, so a writer that opened it before then may lock
    a file that is gone: it checks that the file it locked is still the one at the name, else tries
    again with the new one."""
    lock = path.with_name(f".{path.name}.lock")
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OutputError(f"cannot write {path}: directory {path.parent} is not writable ({e.strerror}); "
                              "choose another -o") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputError(f"{path} is being written by another lowbit process (it holds {lock}); "
                              "wait for it to finish or choose another -o") from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def _unlock(path: Path, fd: int) -> None:
    """Remove the lock file while still holding it (see ``_lock``), then let go."""
    path.with_name(f".{path.name}.lock").unlink(missing_ok=True)
    os.close(fd)


def _remove_stale_partials(path: Path) -> None:
    """Remove the temporary siblings of ``path`` whose writer is dead (the PID in their name is not
    a live process); ``.old-<pid>`` is the name earlier versions moved a replaced output aside to."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(?:partial|old)-(\d+)(?:-.*)?")
    for sibling in path.parent.iterdir():
        match = pattern.fullmatch(sibling.name)
        if match is None or _alive(int(match.group(1))):
            continue
        log.warning("removing %s, left by lowbit process %s, which is gone", sibling, match.group(1))
        _remove(sibling)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    except OverflowError:  # beyond any PID: not a process
        return False
    return True


def _move_into_place(tmp: Path, path: Path) -> None:
    """Rename finished ``tmp`` to ``path``. ``os.replace`` puts a file over a file (or a link) in one
    step; an old directory is first renamed aside under a partial name (so a crash between the two
    renames leaves it to the next writer's cleaning), and back if the second rename fails."""
    real_dir = path.is_dir() and not path.is_symlink()
    if not (path.exists() or path.is_symlink()) or (tmp.is_file() and not real_dir):
        os.replace(tmp, path)
        return
    old = path.with_name(f".{path.name}.partial-{os.getpid()}-replaced")
    os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(old, path)
        raise
    _remove(old)


def _remove(path: Path) -> None:
    """Remove a file or a directory tree, whichever ``path`` is (a missing one is fine)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)

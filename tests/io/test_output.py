"""The output rules every writer shares (``lowbit.io.output``): ``--overwrite`` replaces only what lowbit
wrote, atomically; one writer per output at a time, refused at once; an unwritable output refused
before any work; partials of dead writers cleaned. The CLI runs in-process through ``main``."""

from __future__ import annotations

import fcntl
import logging
import os
import subprocess
import sys

import pytest

from lowbit.cli import main
from lowbit.io.output import OutputError, check_output, reserve_output, staged_output, written_by_lowbit


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


def _dead_pid() -> int:
    """The PID of a process that has exited (and been reaped)."""
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                           check=True)
    return int(child.stdout)


def test_one_output_check_serves_files_and_directories(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(FileExistsError, match="output file .* already exists; choose another path or pass --overwrite"):
        check_output(tmp_path / "f", overwrite=False)
    with pytest.raises(FileExistsError, match="output directory .* already exists"):
        check_output(tmp_path, overwrite=False)
    with pytest.raises(FileExistsError, match="not a lowbit checkpoint, adapter or GGUF file.*remove it yourself"):
        check_output(tmp_path, overwrite=True)
    check_output(tmp_path / "new", overwrite=False)


def test_only_what_lowbit_writes_counts_as_lowbit_s(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    (tmp_path / "fake.gguf").write_bytes(b"not a gguf")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text('{"quantization_config": {"quant_method": "lowbit"}}')
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{")
    assert written_by_lowbit(tmp_path / "m.gguf") and written_by_lowbit(tmp_path / "ckpt")
    for name in ("fake.gguf", "hf", "broken", "missing"):
        assert not written_by_lowbit(tmp_path / name)


@pytest.mark.parametrize("command", [["quantize", "{model}", "-o", "{out}", "--overwrite"],
                                     ["export", "{model}", "--to", "lowbit", "-o", "{out}", "--overwrite"],
                                     ["export-gguf", "{model}", "-o", "{out}", "--type", "Q8_0", "--overwrite"]])
def test_overwrite_leaves_a_directory_lowbit_did_not_write(command, tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "v"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    argv = [a.format(model=tiny_llama_dir, out=out) for a in command]
    assert main([*argv, "--quiet"]) == 2
    err = _one_line_error(capsys)
    assert str(out) in err and "remove it yourself" in err
    assert (out / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v"]


def test_overwrite_replaces_a_lowbit_checkpoint_and_a_gguf_file_leaving_nothing_beside(tiny_llama_dir, tmp_path,
                                                                                     capsys):
    out, gguf = tmp_path / "q", tmp_path / "q.gguf"
    base = ["quantize", str(tiny_llama_dir), "-o", str(out), "--bits", "8", "--group-size", "32", "--gguf", str(gguf),
            "--quiet"]
    assert main(base) == 0
    first = (out / "config.json").read_text()
    assert main(base) == 2 and "already exists" in _one_line_error(capsys)
    assert main([*base[:-1], "--bits", "4", "--overwrite", "--quiet"]) == 0
    assert (out / "config.json").read_text() != first  # the int4 run's checkpoint, not the int8 one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q", "q.gguf"]  # no .old-*, .partial-*, .lock


def test_a_second_writer_fails_at_once(tmp_path, capsys):
    out = tmp_path / "q"
    lock = os.open(tmp_path / ".q.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(lock, fcntl.LOCK_EX)  # another writer's lock: a separate open file, as another process has
    try:
        # the model does not exist: refused for the lock before any loading
        assert main(["quantize", str(tmp_path / "no-such-model"), "-o", str(out), "--quiet"]) == 2
        assert "being written by another lowbit process" in _one_line_error(capsys)
        assert main(["export-gguf", str(tmp_path / "no-such-model"), "-o", str(out), "--quiet"]) == 2
        assert "being written by another lowbit process" in _one_line_error(capsys)
    finally:
        os.close(lock)
    assert main(["quantize", str(tmp_path / "no-such-model"), "-o", str(out), "--quiet"]) == 2
    assert "being written" not in _one_line_error(capsys)


def test_nested_reservations_share_the_lock_and_remove_it(tmp_path):
    out = tmp_path / "q"
    with reserve_output(out, overwrite=False):
        with staged_output(out, overwrite=False, directory=True) as tmp:
            (tmp / "f").write_text("x")
        assert (out / "f").read_text() == "x"
        assert (tmp_path / ".q.lock").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


def test_a_failed_write_leaves_the_old_output(tmp_path):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"GGUF old")
    with pytest.raises(RuntimeError, match="interrupted"):
        with staged_output(out, overwrite=True, directory=False) as tmp:
            tmp.write_bytes(b"GGUF new, half")
            raise RuntimeError("interrupted")
    assert out.read_bytes() == b"GGUF old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_a_ctrl_c_that_code_below_swallowed_still_keeps_the_output_from_its_place(tmp_path):
    """SIGINT while an output is held is remembered: code that catches the KeyboardInterrupt it raises
    (a finalizer, an extension checking signals) cannot let the half-done job finish its output."""
    import signal

    out = tmp_path / "m.gguf"
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with staged_output(out, overwrite=False, directory=False) as tmp:
            try:
                os.kill(os.getpid(), signal.SIGINT)
                for _ in range(1000):  # the handler runs at the next bytecode boundary
                    pass
            except KeyboardInterrupt:
                pass  # swallowed below lowbit
            tmp.write_bytes(b"GGUF finished after the Ctrl-C")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGINT) is before  # the handler is put back


def test_a_ctrl_c_in_a_finaliser_stops_the_job_silently(tmp_path, capfd):
    """SIGINT that lands in a ``__del__`` (where Python drops the exception and prints it, with a
    traceback) is delivered again to the job's own code, with nothing printed."""
    import signal
    import time

    class Finalised:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # the handler runs here, inside the finaliser
                pass

    ran_on = False
    with pytest.raises(KeyboardInterrupt):
        with staged_output(tmp_path / "m.gguf", overwrite=False, directory=False):
            Finalised()  # dropped at once: its __del__ runs here
            for _ in range(500):  # the interrupt arrives again within this wait
                time.sleep(0.01)
            ran_on = True
    assert not ran_on
    assert capfd.readouterr().err == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("flag", ["-o", "--gguf"])
def test_an_output_under_a_file_is_refused_before_work(flag, tmp_path, capsys):
    (tmp_path / "somefile").write_text("x")
    outputs = {"-o": str(tmp_path / "q"), flag: str(tmp_path / "somefile" / "sub")}
    argv = ["quantize", str(tmp_path / "no-such-model"), *(a for kv in outputs.items() for a in kv), "--quiet"]
    assert main(argv) == 2
    assert "somefile is a file, not a directory; choose another -o" in _one_line_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["somefile"]


def test_an_unwritable_directory_is_refused_before_work(tmp_path, capsys):
    # /proc takes no new entries, even from root (whom a read-only mode would not stop)
    assert main(["export-gguf", str(tmp_path / "no-such-model"), "-o", "/proc/lowbit-test.gguf", "--quiet"]) == 2
    assert "cannot write /proc/lowbit-test.gguf" in _one_line_error(capsys)
    with pytest.raises(OutputError, match="not writable"):
        with reserve_output("/proc/lowbit-test", overwrite=False):
            pass


def test_partials_of_dead_writers_are_removed_when_the_next_writer_starts(tmp_path, caplog):
    dead = _dead_pid()
    stale_dir, stale_old = tmp_path / f".q.partial-{dead}-x1y2", tmp_path / f".q.old-{dead}"
    stale_dir.mkdir()
    (stale_dir / "model.safetensors").write_bytes(b"half")
    stale_old.write_text("left by an earlier lowbit")
    live = tmp_path / f".q.partial-{os.getppid()}-abcd"  # a live process's: still being written
    live.mkdir()
    other = tmp_path / f".other.partial-{dead}-abcd"  # another output's: not this writer's to judge
    other.mkdir()
    with caplog.at_level(logging.WARNING, logger="lowbit.io.output"):
        with reserve_output(tmp_path / "q", overwrite=False):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name])
    removed = [r.getMessage() for r in caplog.records]
    assert len(removed) == 2 and all(f"left by lowbit process {dead}, which is gone" in m for m in removed)


def test_a_writer_killed_mid_write_blocks_no_one_and_its_partial_is_removed(tmp_path, capsys):
    """Another process holds the output and is killed by SIGTERM while writing (case 9 of issue 16)."""
    out = tmp_path / "q"
    script = ("import sys, time; from lowbit.io.output import staged_output\n"
              f"with staged_output({str(out)!r}, overwrite=False, directory=True) as tmp:\n"
              "    (tmp / 'model.safetensors').write_bytes(b'half')\n"
              "    print('writing', flush=True); time.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert child.stdout.readline() == "writing\n"
        assert main(["quantize", str(tmp_path / "no-such-model"), "-o", str(out), "--quiet"]) == 2
        assert "being written by another lowbit process" in _one_line_error(capsys)
    finally:
        child.terminate()
        child.wait()
    assert any(p.name.startswith(f".q.partial-{child.pid}-") for p in tmp_path.iterdir())
    with reserve_output(out, overwrite=False):
        pass
    assert list(tmp_path.iterdir()) == []

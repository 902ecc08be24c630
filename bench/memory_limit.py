"""Run a lowbit command inside a cgroup v1 memory limit and record what it took.

    python bench/memory_limit.py --limit-mib 2048 --output OUT NAME -- lowbit quantize qwen2.5-coder-1.5b -o OUT ...

Needs root and cgroup v1's memory controller (/sys/fs/cgroup/memory). The command runs in a fresh
cgroup ``lowbit-NAME`` whose ``memory.limit_in_bytes`` is the limit (the page cache counts against it,
so only a job that streams its files fits) and without swap; the row records the exit status, wall
time, the cgroup's peak usage (``memory.max_usage_in_bytes``: resident memory and page cache) and
whether the kernel killed it for memory (``memory.oom_control``), and the SHA-256 of the output
directory's files, to compare with an unconstrained run of the same command (``--limit-mib 0``: no
cgroup). Rows go to bench/results/memory_limit.json (.md), one per NAME, replaced when run again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench_results import write_results

CGROUP = Path("/sys/fs/cgroup/memory")
RESULTS = Path(__file__).parent / "results" / "memory_limit.json"


def _tree_sha256(path: Path) -> str | None:
    """SHA-256 of the file ``path`` (its contents: ``sha256sum``'s), or over the relative names and
    contents of the files under the directory ``path``; None when it does not exist. Two runs that
    wrote different paths compare equal when they wrote the same bytes."""
    if not path.exists():
        return None
    h = hashlib.sha256()
    for f in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
        if f != path:
            h.update(str(f.relative_to(path)).encode())
        with open(f, "rb") as data:
            for chunk in iter(lambda: data.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def run(name: str, limit_mib: int, command: list[str], output: Path | None) -> dict:
    group = CGROUP / f"lowbit-{name}"
    if limit_mib:
        group.mkdir(exist_ok=True)
        (group / "memory.limit_in_bytes").write_text(str(limit_mib << 20))
        if (group / "memory.memsw.limit_in_bytes").exists():
            (group / "memory.memsw.limit_in_bytes").write_text(str(limit_mib << 20))
        (group / "memory.max_usage_in_bytes").write_text("0")
    start = time.time()

    def enter() -> None:  # in the child, before exec: join the cgroup
        if limit_mib:
            (group / "cgroup.procs").write_text(str(os.getpid()))

    timed = ["/usr/bin/time", "-f", "%M", "-o", f"/tmp/lowbit-{name}.rss", *command]
    rc = subprocess.run(timed, preexec_fn=enter).returncode
    row = {"name": name, "limit_mib": limit_mib, "command": " ".join(command), "exit": rc,
           "seconds": round(time.time() - start, 1),
           "peak_rss_mib": round(int(Path(f"/tmp/lowbit-{name}.rss").read_text().split()[-1]) / 1024, 1)}
    if limit_mib:
        row["cgroup_peak_mib"] = round(int((group / "memory.max_usage_in_bytes").read_text()) / 2**20, 1)
        row["oom_killed"] = "oom_kill 0" not in (group / "memory.oom_control").read_text()
    if output is not None:
        row["output_sha256"] = _tree_sha256(output)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name")
    parser.add_argument("--limit-mib", type=int, required=True, help="0: no limit")
    parser.add_argument("--output", type=Path, help="the command's output directory, hashed when it ends")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    row = run(args.name, args.limit_mib, command, args.output)
    rows = json.loads(RESULTS.read_text())["rows"] if RESULTS.is_file() else []
    rows = [r for r in rows if r["name"] != row["name"]] + [row]
    table = ["| name | limit MiB | exit | seconds | peak RSS MiB | cgroup peak MiB | OOM | output SHA-256 |",
             "|---|---|---|---|---|---|---|---|"]
    table += [f"| {r['name']} | {r['limit_mib'] or 'none'} | {r['exit']} | {r['seconds']} | {r['peak_rss_mib']} | "
              f"{r.get('cgroup_peak_mib', '')} | {r.get('oom_killed', '')} | {(r.get('output_sha256') or '')[:16]} |"
              for r in rows]
    write_results(RESULTS, {"rows": rows}, table)
    print(json.dumps(row))
    sys.exit(row["exit"])


if __name__ == "__main__":
    main()

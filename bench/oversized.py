"""Huge files in a unit directory: does the manager keep answering, how soon is a new unit seen.

``python -m bench.oversized [--before]`` (as root: it boots its own sandboxed manager). Prints,
with the daemon running: how long ``systemctl --user is-system-running`` takes before and after
a sparse 1 GiB ``big.service`` appears (the slowest answer over 15 s), and how long a new unit
file takes to show in ``/api/v1/findings`` next to sparse 16 GiB files. ``--before`` leaves out
the 16 GiB ``huge.service``, which code that loads every unit file would hand the manager for
half an hour. The figures go to docs/reliability.md; no test asserts on them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import http
from bench.daemonproc import HOST, DaemonProcess
from provenanced.sandbox import Sandbox

GIB = 1 << 30
WATCH = 15.0  # seconds of manager answers sampled after the big unit appears
PATIENCE = 300.0  # the longest a single answer or detection is waited for


def _sparse(path: Path, size: int) -> None:
    with path.open("wb"):
        pass
    os.truncate(path, size)


def _manager_answer(sandbox: Sandbox) -> float:
    """Seconds for one ``systemctl --user is-system-running``."""
    started = time.perf_counter()
    try:
        subprocess.run(
            ["systemctl", "--user", "is-system-running"],
            env=sandbox.env,
            capture_output=True,
            timeout=PATIENCE,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return float("inf")
    return time.perf_counter() - started


def _reported(daemon: DaemonProcess, path: Path) -> bool:
    body = http.get(HOST, daemon.port, "/api/v1/findings", timeout=PATIENCE).body
    return any(f["path"] == str(path) for f in json.loads(body)["findings"])


def _wait_reported(daemon: DaemonProcess, path: Path, since: float) -> float:
    """Seconds from ``since`` until the daemon reports a finding on ``path``."""
    while time.perf_counter() - since < PATIENCE:
        if _reported(daemon, path):
            return time.perf_counter() - since
        time.sleep(0.01)
    return float("inf")


def _big_unit(sandbox: Sandbox, daemon: DaemonProcess) -> None:
    idle = sorted(_manager_answer(sandbox) for _ in range(5))
    print(f"manager answer, no big file: median {idle[2] * 1000:.1f} ms")
    big = sandbox.config_dir / "big.service"
    started = time.perf_counter()
    _sparse(big, GIB)
    answers, seen = [], float("inf")
    while time.perf_counter() - started < WATCH:
        answers.append(_manager_answer(sandbox))
        if seen == float("inf") and _reported(daemon, big):
            seen = time.perf_counter() - started
    if seen == float("inf"):
        seen = _wait_reported(daemon, big, started)
    print(
        f"manager answer with a 1 GiB big.service, over {WATCH:.0f} s: "
        f"max {max(answers) * 1000:.1f} ms, median {sorted(answers)[len(answers) // 2] * 1000:.1f} ms "
        f"({len(answers)} calls); big.service reported after {seen:.2f} s"
    )
    big.unlink()
    while _manager_answer(sandbox) > 1.0:
        pass  # the manager is still reading it: the next figure must not include that


def _huge_files(sandbox: Sandbox, daemon: DaemonProcess, names: tuple[str, ...]) -> None:
    for name in names:
        _sparse(sandbox.config_dir / name, 16 * GIB)
    new = sandbox.config_dir / f"next-{len(names)}.service"
    started = time.perf_counter()
    new.write_text("[Service]\nExecStart=/bin/true\n")
    seen = _wait_reported(daemon, new, started)
    print(f"new unit next to 16 GiB {' + '.join(names)}: reported after {seen:.3f} s")
    for name in names:
        (sandbox.config_dir / name).unlink()


def main() -> None:
    """Boot a sandbox with the example Home Manager tree, run the daemon, inflict the files."""
    sandbox = Sandbox()
    try:
        sandbox.install_home_manager()
        sandbox.start()
        with tempfile.TemporaryDirectory() as tmp:
            daemon = DaemonProcess(sandbox, Path(tmp) / "daemon.log", need_daemon_reload="flag")
            try:
                daemon.start()
                _big_unit(sandbox, daemon)
                _huge_files(sandbox, daemon, ("huge.img",))
                if "--before" not in sys.argv[1:]:
                    _huge_files(sandbox, daemon, ("huge.img", "huge.service"))
            finally:
                daemon.stop()
    finally:
        sandbox.stop()


if __name__ == "__main__":
    main()

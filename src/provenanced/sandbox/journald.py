"""A standalone systemd-journald for machines where none runs (root only)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
from pathlib import Path

from provenanced.sandbox._proc import (
    JOURNAL_SOCKET,
    JOURNALD_BINARY,
    SYSTEM_PATH,
    SandboxError,
    _end_group,
    _poll,
    _socket_connectable,
    _tail,
)

# --- journald --------------------------------------------------------------------------------


class Journald:
    """A standalone systemd-journald we started; only its starter stops it."""

    def __init__(self, proc: subprocess.Popen[bytes], log: Path) -> None:
        self._proc = proc
        self._log = log

    @property
    def pid(self) -> int:
        """The journald pid, so tests can prove it is gone after stop()."""
        return self._proc.pid

    def stop(self) -> None:
        """Terminate journald and drop its log; safe to call twice."""
        _end_group(self._proc, signal.SIGTERM, grace=5.0)
        self._log.unlink(missing_ok=True)


def journald_listening() -> bool:
    """Whether some journald accepts entries now, whoever started it."""
    return _socket_connectable(JOURNAL_SOCKET)


def ensure_journald(timeout: float = 10.0) -> Journald | None:
    """Make sure journald listens: None when one already does, else a handle to the one we start."""
    if journald_listening():
        return None
    if os.geteuid() != 0:
        raise SandboxError(f"no journald listens on {JOURNAL_SOCKET} and only root can start one")
    if not os.access(JOURNALD_BINARY, os.X_OK):
        raise SandboxError(
            f"no journald listens on {JOURNAL_SOCKET} and {JOURNALD_BINARY} is missing"
        )
    fd, log_name = tempfile.mkstemp(prefix="provenanced-journald-", suffix=".log")
    log = Path(log_name)
    with os.fdopen(fd, "wb") as out:
        proc = subprocess.Popen(
            [str(JOURNALD_BINARY)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={"PATH": SYSTEM_PATH, "LANG": "C.UTF-8"},
            start_new_session=True,
        )
    handle = Journald(proc, log)
    answered = _poll(
        lambda: proc.poll() is not None or _socket_connectable(JOURNAL_SOCKET), timeout
    )
    if answered and proc.returncode is None:
        return handle
    tail = _tail(log)
    handle.stop()
    raise SandboxError(f"journald did not open {JOURNAL_SOCKET} within {timeout}s:\n{tail}")


def read_journal(*matches: str) -> list[dict[str, str]]:
    """The journal's entries matching every ``FIELD=value``, as journalctl's JSON has them."""
    out = subprocess.run(
        ["journalctl", "--no-pager", "-o", "json", *matches],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    ).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]

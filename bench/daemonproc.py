"""`python -m provenanced run` in a subprocess on a sandbox, and ways to look at it from outside.

A subprocess rather than the daemon on our own loop: its CPU seconds and RSS in /proc are its
alone, it has its own GIL (our polling does not stall its event loop), and it starts exactly as
the installed user service does.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench import http
from bench.proc import ProcSample, sample
from provenanced.sandbox import Sandbox

HOST = "127.0.0.1"


class DaemonError(Exception):
    """The daemon did not come up or went away."""


def _drain(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while sock.recv(4096):
            pass


class DaemonProcess:
    """One provenanced daemon watching one sandbox; stop() always leaves no process behind."""

    def __init__(self, sandbox: Sandbox, log: Path, **policy: object) -> None:
        self.sandbox = sandbox
        self.port = http.free_port()
        self.log = log
        self.env = dict(sandbox.env)
        self.env.update(
            PROVENANCED_METRICS__LISTEN=f"{HOST}:{self.port}",
            PROVENANCED_STATE_DIR=str(sandbox.state_dir),
            # The fake store stands in for /nix/store.
            PROVENANCED_PROVENANCE__MANAGED_ROOTS=json.dumps([str(sandbox.store)]),
            PROVENANCED_LOG__FORMAT="logfmt",
            PROVENANCED_LOG__LEVEL="info",
        )
        for key, value in policy.items():
            self.env[f"PROVENANCED_POLICY__{key.upper()}"] = str(value)
        self._proc: subprocess.Popen[bytes] | None = None
        self.notified_seconds: float | None = None  # start → READY=1, once start() saw it
        self._notify: socket.socket | None = None

    @property
    def pid(self) -> int:
        """The daemon's pid."""
        if self._proc is None:
            raise DaemonError("the daemon was not started")
        return self._proc.pid

    def start(self, timeout: float = 120.0) -> float:
        """Start the daemon and return the seconds until /-/ready answers 200.

        ``notified_seconds`` is then the time to its ``READY=1``, received as systemd would on a
        NOTIFY_SOCKET of our own.
        """
        notify_path = self.log.with_suffix(".notify")
        notify_path.unlink(missing_ok=True)
        # Kept open while the daemon runs: it notifies again on SIGHUP and when stopping.
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._notify.bind(str(notify_path))
        self._notify.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        started = time.perf_counter()
        with self.log.open("ab") as out:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "provenanced", "run"],
                env={**self.env, "NOTIFY_SOCKET": str(notify_path)},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        ready = self._wait_ready(self._notify, started, timeout)
        # Read on as systemd does: a unix datagram queue holds 10 messages, and a sender whose
        # queue is full blocks (the daemon's loop with it) on its next RELOADING=1.
        threading.Thread(target=_drain, args=(self._notify,), daemon=True).start()
        return ready

    def _wait_ready(self, notify: socket.socket, started: float, timeout: float) -> float:
        assert self._proc is not None
        deadline = started + timeout
        ready: float | None = None
        # After /-/ready answers, READY=1 gets 2 s more to arrive; without it the figure is n/a.
        while time.perf_counter() < (deadline if ready is None else started + ready + 2.0):
            # A datagram is timed when read: at most one 20 ms poll late.
            while self.notified_seconds is None and select.select([notify], [], [], 0)[0]:
                if b"READY=1" in notify.recv(4096).split(b"\n"):
                    self.notified_seconds = time.perf_counter() - started
            if self._proc.poll() is not None:
                raise DaemonError(f"the daemon exited with {self._proc.returncode}:\n{self.tail()}")
            if ready is None:
                with contextlib.suppress(OSError, http.HttpError):
                    if http.get(HOST, self.port, "/-/ready", timeout=5.0).status == 200:
                        ready = time.perf_counter() - started
            if ready is not None and self.notified_seconds is not None:
                return ready
            select.select([notify], [], [], 0.02)
        if ready is not None:
            return ready
        raise DaemonError(f"the daemon was not ready within {timeout}s:\n{self.tail()}")

    def tail(self, lines: int = 20) -> str:
        """The end of the daemon's log, to say why it failed."""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def scrape(self, path: str = "/metrics") -> http.Response:
        """One GET against the daemon."""
        response = http.get(HOST, self.port, path)
        if response.status != 200:
            raise DaemonError(f"GET {path} answered {response.status}")
        return response

    def metrics(self) -> dict[str, float]:
        """The parsed samples of one scrape."""
        return http.samples(self.scrape().body.decode())

    def proc(self) -> ProcSample:
        """CPU, RSS and context switches of the daemon process."""
        return sample(self.pid)

    def hangup(self) -> None:
        """SIGHUP: the daemon re-reads its configuration and does a full resync."""
        os.kill(self.pid, signal.SIGHUP)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL the whole process group if it lingers; idempotent."""
        proc = self._proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)
        if self._notify is not None:
            path = self._notify.getsockname()
            with contextlib.suppress(OSError):
                self._notify.shutdown(socket.SHUT_RDWR)  # wakes the draining thread
            self._notify.close()
            self._notify = None
            Path(path).unlink(missing_ok=True)

"""`python -m provenanced run` in a subprocess on a sandbox, and ways to look at it from outside.

A subprocess rather than the daemon on our own loop: its CPU seconds and RSS in /proc are its
alone, it has its own GIL (our polling does not stall its event loop), and it starts exactly as
the installed user service does.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench import http
from bench.proc import ProcSample, sample
from provenanced.sandbox import Sandbox

HOST = "127.0.0.1"


class DaemonError(Exception):
    """The daemon did not come up or went away."""


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

    @property
    def pid(self) -> int:
        """The daemon's pid."""
        if self._proc is None:
            raise DaemonError("the daemon was not started")
        return self._proc.pid

    def start(self, timeout: float = 120.0) -> float:
        """Start the daemon and return the seconds until /-/ready answers 200."""
        started = time.perf_counter()
        with self.log.open("ab") as out:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "provenanced", "run"],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = started + timeout
        while time.perf_counter() < deadline:
            if self._proc.poll() is not None:
                raise DaemonError(f"the daemon exited with {self._proc.returncode}:\n{self.tail()}")
            with contextlib.suppress(OSError, http.HttpError):
                if http.get(HOST, self.port, "/-/ready", timeout=5.0).status == 200:
                    return time.perf_counter() - started
            time.sleep(0.02)
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
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)

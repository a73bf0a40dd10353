"""Shared test tools: the daemon in-process or as a real process against a sandbox, and probes."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from helpers import wait_until
from provenanced.config import Settings
from provenanced.daemon.engine import Engine
from provenanced.daemon.service import Daemon
from provenanced.model import FindingKind
from provenanced.sandbox import HostSandbox, Sandbox

WEB = "podman-web.service"
# Every wait is bounded generously (a shared 2-core box), and every one polls: no fixed sleeps.
WAIT = 30.0


async def eventually(
    predicate: Callable[[], object],
    timeout: float = WAIT,
    what: str = "",
    state: Callable[[], object] | None = None,
) -> None:
    """Yield to the daemon's loop until a condition holds; at the deadline, say what and why."""
    try:
        async with asyncio.timeout(timeout):
            while not predicate():
                await asyncio.sleep(0.02)
    except TimeoutError:
        name = what or getattr(predicate, "__name__", repr(predicate))
        last = f" (last: {state()!r})" if state is not None else ""
        raise AssertionError(f"not within {timeout}s: {name}{last}") from None


def settings_for(
    sandbox: Sandbox, manager: dict[str, object] | None = None, **policy: object
) -> Settings:
    """Settings for a test daemon: fast quiet window, no alert rate limit, any free port."""
    return Settings(
        state_dir=sandbox.state_dir,
        manager=manager or {},
        metrics={"listen": "127.0.0.1:0"},
        policy={"quiet_window": 0.2, "alert_min_interval": 0, **policy},
        log={"format": "logfmt", "level": "warning"},
    )


class Running:
    """A daemon on the test's own event loop, with handles to poke and probe it."""

    def __init__(self, daemon: Daemon, stop: asyncio.Event, task: asyncio.Task[None]) -> None:
        self.daemon, self.stop, self.task = daemon, stop, task

    @property
    def engine(self) -> Engine:
        return self.daemon.engine

    def alive(self) -> bool:
        """The daemon's task is still running (a crashed loop would have ended it)."""
        return not self.task.done()

    def findings(self) -> set[tuple[str, str, str]]:
        return {(f.kind.value, f.unit, f.path) for f in self.engine.status.findings}

    def has(self, kind: FindingKind, path: Path | str) -> bool:
        return any(f.kind is kind and f.path == str(path) for f in self.engine.status.findings)

    def paths(self, kind: FindingKind) -> set[str]:
        return {f.path for f in self.engine.status.findings if f.kind is kind}

    def sample(self, name: str, **labels: str) -> float:
        value = self.daemon.telemetry.registry.get_sample_value(name, labels)
        return value or 0.0


@contextlib.asynccontextmanager
async def start_daemon(
    sandbox: Sandbox, settings: Settings | None = None, **policy: object
) -> AsyncIterator[Running]:
    """Run the daemon in-process against the sandbox; stop it (bounded) on the way out."""
    daemon = Daemon(settings or settings_for(sandbox, **policy), env=sandbox.env)
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop), name="test.daemon")
    running = Running(daemon, stop, task)
    try:
        await eventually(
            lambda: daemon.engine.ready.is_set() or task.done(), WAIT, "the first full audit"
        )
        if task.done():
            task.result()  # surface why it died
        yield running
    finally:
        stop.set()
        async with asyncio.timeout(15):
            await task


def http_get(address: tuple[str, int], path: str) -> tuple[int, bytes]:
    """One GET on the daemon's endpoint: status and body."""
    conn = http.client.HTTPConnection(*address, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


# --- the daemon as a real process ------------------------------------------------------------

_LISTENING = re.compile(r"event=http\.listening host=\S+ port=(\d+)")


class DaemonProcess:
    """``python -m provenanced run [ARGS]`` as a child process, optionally behind a wrapper."""

    def __init__(
        self,
        sandbox: Sandbox | HostSandbox,
        workdir: Path,
        config: str,
        wrapper: Sequence[str] = (),
        args: Sequence[str] = (),
    ) -> None:
        self.sandbox = sandbox
        self.config_path = workdir / "config.toml"
        self.config_path.write_text(config)
        self.log_path = workdir / "daemon.log"
        self._log = self.log_path.open("wb")
        env = {**sandbox.env, "PYTHONUNBUFFERED": "1"}
        argv = [
            *wrapper,
            sys.executable,
            "-m",
            "provenanced",
            "--config",
            str(self.config_path),
            "run",
            *args,
        ]
        self.proc = subprocess.Popen(
            argv, env=env, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT
        )
        self.port = 0

    def peak_rss(self) -> int:
        """The process's high-water resident set, bytes (VmHWM)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmHWM in /proc/PID/status")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_ready(self, timeout: float = WAIT) -> None:
        """Wait for the HTTP port in the log and for /-/ready to say 200."""

        def port() -> int:
            if not self.alive():
                raise AssertionError(f"the daemon exited {self.proc.returncode}:\n{self.log()}")
            match = _LISTENING.search(self.log())
            return int(match.group(1)) if match else 0

        self.port = wait_until(port, timeout, message="the daemon's HTTP port in its log")
        wait_until(
            lambda: self.get("/-/ready")[0] == 200, timeout, message="the daemon to be ready"
        )

    def get(self, path: str) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read()
        except OSError:
            return 0, b""
        finally:
            conn.close()

    def findings(self) -> list[dict[str, str]]:
        status, body = self.get("/api/v1/findings")
        assert status == 200, (status, body)
        findings: list[dict[str, str]] = json.loads(body)["findings"]
        return findings

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        status, body = self.get("/metrics")
        assert status == 200, (status, body)
        return parse_metrics(body.decode())

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics().get((name, tuple(sorted(labels.items()))), 0.0)

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> int:
        """SIGTERM, then SIGKILL after a bounded wait; returns the exit status."""
        try:
            if self.alive():
                self.proc.send_signal(signal.SIGTERM)
            return self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout=15)
        finally:
            self._log.close()


@contextlib.contextmanager
def daemon_process(
    sandbox: Sandbox | HostSandbox,
    workdir: Path,
    config: str,
    wrapper: Sequence[str] = (),
    ready_timeout: float = WAIT,
    args: Sequence[str] = (),
) -> Iterator[DaemonProcess]:
    """A ready daemon process; always stopped (and reaped) on the way out."""
    proc = DaemonProcess(sandbox, workdir, config, wrapper, args)
    try:
        proc.wait_ready(ready_timeout)
        yield proc
    finally:
        proc.stop()


@contextlib.contextmanager
def tmpfs_over(path: Path, size: str = "1m") -> Iterator[Path]:
    """A small tmpfs mounted over ``path`` (root only), unmounted whatever happens inside."""
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)], check=True
    )
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], check=False).returncode != 0:
            subprocess.run(["umount", "--lazy", str(path)], check=True)


def config_toml(sandbox: Sandbox, *extra: str) -> str:
    """A config file for a daemon process: loopback on a free port, logfmt at info."""
    return "\n".join(
        [
            f"state_dir = {json.dumps(str(sandbox.state_dir))}",
            "[metrics]",
            'listen = "127.0.0.1:0"',
            "[log]",
            'format = "logfmt"',
            'level = "info"',
            *extra,
            "",
        ]
    )


def parse_metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text exposition, keyed by name and sorted labels."""
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def unit_file(directory: Path, name: str, body: str = "[Service]\nExecStart=/bin/true\n") -> Path:
    """Write one small unit file and return its path."""
    path = directory / name
    path.write_text(body)
    return path


def poll(predicate: Callable[[], Any], timeout: float = WAIT, message: str = "") -> Any:
    """``wait_until`` with the suite's generous default bound."""
    return wait_until(predicate, timeout, message=message)


def monotonic() -> float:
    return time.monotonic()


def env_without(env: dict[str, str], *keys: str) -> dict[str, str]:
    return {k: v for k, v in env.items() if k not in keys}


def is_root() -> bool:
    return os.geteuid() == 0

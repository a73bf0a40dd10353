"""`python -m bench.httpattack`: RSS and /metrics latency of a daemon under a header-flood attack.

The attack of issue 10: C connections, each sending a request line and H header lines of L bytes
and never the blank line that ends the head; a connection the daemon drops is opened again, so
the pressure lasts the whole attack. Meanwhile /metrics is scraped every 0.25 s and the daemon's
RSS sampled. Then the attackers hang up and RSS is read again once it settles. With
``--resync`` the scrape latency is also taken while SIGHUP full resyncs run back to back, the
moment the event loop is busiest.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench import http
from bench.daemonproc import HOST, DaemonProcess
from bench.proc import loadavg, sample
from bench.run import log
from bench.stats import median, ms, percentile
from bench.tree import generate
from provenanced.sandbox import Sandbox, ensure_journald

MIB = 2**20


@dataclass(slots=True)
class Scrapes:
    """Scrape durations; failures (refused, reset, timed out, not 200) counted apart."""

    seconds: list[float] = field(default_factory=list)
    failed: int = 0

    def line(self) -> str:
        worst = max(self.seconds) if self.seconds else math.nan
        return (
            f"{len(self.seconds)} ok, {self.failed} failed; p50 {ms(median(self.seconds))} "
            f"p99 {ms(percentile(self.seconds, 99))} max {ms(worst)}"
        )


def scrape_until(port: int, done: Callable[[], bool], every: float = 0.25) -> Scrapes:
    """GET /metrics every ``every`` seconds until ``done()``; a 10 s timeout counts as failed."""
    result = Scrapes()
    while not done():
        try:
            response = http.get(HOST, port, "/metrics", timeout=10.0)
        except (OSError, http.HttpError):
            result.failed += 1
        else:
            if response.status == 200:
                result.seconds.append(response.seconds)
            else:
                result.failed += 1
        time.sleep(every)
    return result


class Attack:
    """C threads, each holding one never-finished request head open, reconnecting when dropped."""

    def __init__(self, port: int, connections: int, headers: int, line_bytes: int) -> None:
        self.port = port
        self.stop = threading.Event()
        self.connects = 0
        self.sent = 0
        self._lock = threading.Lock()
        pad = b"a" * (line_bytes - len(b"X-Pad-000: \r\n"))
        self._head = b"GET /metrics HTTP/1.1\r\nHost: victim\r\n"
        self._lines = [b"X-Pad-%03d: %s\r\n" % (i, pad) for i in range(headers)]
        self._threads = [
            threading.Thread(target=self._run, name=f"attack-{i}", daemon=True)
            for i in range(connections)
        ]

    def __enter__(self) -> Attack:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(10)

    def _run(self) -> None:
        while not self.stop.is_set():
            with contextlib.suppress(OSError):
                self._one_connection()
            # A dropped attacker comes back, but not in a busy loop that would eat the 2 cores.
            self.stop.wait(0.1)

    def _one_connection(self) -> None:
        with socket.create_connection((HOST, self.port), timeout=1.0) as sock:
            with self._lock:
                self.connects += 1
            for data in (self._head, *self._lines):
                if not self._send(sock, data):
                    return
            # Never send the blank line: hold the head open until the daemon drops it.
            while not self.stop.is_set():
                try:
                    if not sock.recv(65536):
                        return
                except TimeoutError:
                    continue

    def _send(self, sock: socket.socket, data: bytes) -> bool:
        view = memoryview(data)
        while view and not self.stop.is_set():
            try:
                count = sock.send(view)
            except TimeoutError:
                continue
            view = view[count:]
            with self._lock:
                self.sent += count
        return not view


def rss_while(pid: int, done: Callable[[], bool], every: float = 0.2) -> tuple[int, int]:
    """Peak VmRSS and peak thread count sampled until ``done()``."""
    peak = threads = 0
    while not done():
        peak = max(peak, sample(pid).rss_bytes)
        threads = max(threads, _threads(pid))
        time.sleep(every)
    return peak, threads


def _threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 0


def run(args: argparse.Namespace) -> None:
    """Boot a sandbox with ``--units`` units, start the daemon, measure idle, attack, after."""
    ensure_journald()
    workdir = Path(tempfile.mkdtemp(prefix="provenanced-httpattack-"))
    log(f"load {loadavg()}; logs in {workdir}")
    sandbox = Sandbox(timeout=120.0)
    try:
        generate(sandbox, args.units)
        sandbox.start()
        daemon = DaemonProcess(sandbox, workdir / "daemon.log", need_daemon_reload="flag")
        daemon.env.update(item.split("=", 1) for item in args.env)
        try:
            daemon.start()
            _measure(daemon, args)
        finally:
            daemon.stop()
    finally:
        sandbox.stop()


def _measure(daemon: DaemonProcess, args: argparse.Namespace) -> None:
    pid, port = daemon.pid, daemon.port
    idle_deadline = time.monotonic() + args.idle
    idle = scrape_until(port, lambda: time.monotonic() > idle_deadline, every=0.1)
    log(f"idle: RSS {sample(pid).rss_bytes / MIB:.1f} MiB; /metrics {idle.line()}")
    attack = Attack(port, args.connections, args.headers, args.line_bytes)
    with attack:
        end = time.monotonic() + args.seconds
        done = threading.Event()
        rss: list[tuple[int, int]] = []
        sampler = threading.Thread(target=lambda: rss.append(rss_while(pid, done.is_set)))
        sampler.start()
        under = scrape_until(port, lambda: time.monotonic() > end)
        done.set()
        sampler.join()
    peak, threads = rss[0]
    log(
        f"attack {args.connections}x{args.headers}x{args.line_bytes // 1024} KiB for "
        f"{args.seconds:.0f} s: RSS peak {peak / MIB:.1f} MiB, threads peak {threads}, "
        f"{attack.connects} connects, {attack.sent / MIB:.0f} MiB sent; /metrics {under.line()}"
    )
    settle = time.monotonic() + args.settle
    while time.monotonic() < settle:
        time.sleep(0.5)
    log(f"after: RSS {sample(pid).rss_bytes / MIB:.1f} MiB, threads {_threads(pid)}")
    if args.resync:
        _during_resyncs(daemon, args.resync)


def _during_resyncs(daemon: DaemonProcess, count: int) -> None:
    """Scrape while SIGHUP full resyncs run back to back; also time each resync."""
    name = "provenanced_resync_duration_seconds_count"
    state = {"left": count, "seen": daemon.metrics().get(name, 0.0)}

    def done() -> bool:
        seen = daemon.metrics().get(name, 0.0)
        if seen > state["seen"]:
            state["seen"] = seen
            state["left"] -= 1
            if state["left"] > 0:
                daemon.hangup()
        return state["left"] <= 0

    daemon.hangup()
    scrapes = scrape_until(daemon.port, done, every=0.05)
    log(f"during {count} full resyncs: /metrics {scrapes.line()}")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.httpattack", description=__doc__)
    parser.add_argument("--units", type=int, default=100, help="units in the sandbox (100)")
    parser.add_argument("--connections", type=int, default=60, help="attacking connections (60)")
    parser.add_argument("--headers", type=int, default=99, help="header lines each (99)")
    parser.add_argument("--line-bytes", type=int, default=65000, help="bytes per header line")
    parser.add_argument("--seconds", type=float, default=20.0, help="attack length (20 s)")
    parser.add_argument("--idle", type=float, default=5.0, help="idle scraping before (5 s)")
    parser.add_argument("--settle", type=float, default=10.0, help="wait after the attack (10 s)")
    parser.add_argument("--resync", type=int, default=0, help="full resyncs to scrape during")
    parser.add_argument(
        "--env", action="append", default=[], help="KEY=VALUE for the daemon's environment"
    )
    run(parser.parse_args())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

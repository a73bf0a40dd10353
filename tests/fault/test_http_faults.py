"""The HTTP endpoint against hostile and careless clients, and while the event loop is stuck."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from daemonkit import WAIT, config_toml, daemon_process, http_get, poll, start_daemon
from provenanced.sandbox import Sandbox

pytestmark = pytest.mark.fault

MIB = 2**20
# The attack of issue 10, scaled down: each connection sends 99 header lines of 64 KB (~6 MiB)
# and never the blank line that ends the head. Holding all of it, the daemon grows by ~190 MiB.
_CONNECTIONS = 30
_HEAD = b"GET /metrics HTTP/1.1\r\nHost: victim\r\n"
_LINES = tuple(b"X-Pad-%02d: %s\r\n" % (i, b"a" * 64000) for i in range(99))


class _Flood:
    """Attackers that send the oversized head again each time the daemon drops them."""

    def __init__(self, address: tuple[str, int], connections: int) -> None:
        self.address = address
        self.stop = threading.Event()
        self.attempts = 0
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, daemon=True) for _ in range(connections)
        ]

    def __enter__(self) -> _Flood:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(WAIT)

    def _run(self) -> None:
        while not self.stop.is_set():
            with contextlib.suppress(OSError):
                self._attack()

    def _attack(self) -> None:
        with socket.create_connection(self.address, timeout=0.5) as sock:
            try:
                for data in (_HEAD, *_LINES):
                    sock.sendall(data)
            finally:
                with self._lock:
                    self.attempts += 1
            while not self.stop.is_set():  # hold the unfinished head until dropped
                with contextlib.suppress(TimeoutError):
                    if not sock.recv(65536):
                        return


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/PID/status")


class TestHeaderFlood:
    def test_memory_stays_bounded_and_metrics_answer(
        self, fresh_sandbox: Sandbox, tmp_path: Path
    ) -> None:
        """30 connections flooding never-finished heads of 6 MiB: RSS stays near idle, /metrics answers."""
        with daemon_process(fresh_sandbox, tmp_path, config_toml(fresh_sandbox)) as proc:
            pid = proc.proc.pid
            idle = _rss(pid)
            with _Flood(("127.0.0.1", proc.port), _CONNECTIONS) as flood:
                poll(lambda: flood.attempts >= 2 * _CONNECTIONS, message="two heads per attacker")
                assert proc.get("/metrics")[0] == 200
                peak = proc.peak_rss()
            assert peak - idle < 64 * MIB, f"RSS grew {(peak - idle) / MIB:.0f} MiB under the flood"
            poll(lambda: _rss(pid) - idle < 16 * MIB, message="RSS back near its idle level")
            assert proc.get("/-/healthy")[0] == 200


class TestHangUp:
    def test_a_client_hanging_up_mid_request_is_one_debug_line(
        self, fresh_sandbox: Sandbox, tmp_path: Path
    ) -> None:
        """Closing (FIN) or resetting (RST) in the middle of the head logs one debug line, no warning."""
        config = config_toml(fresh_sandbox).replace('level = "info"', 'level = "debug"')
        with daemon_process(fresh_sandbox, tmp_path, config) as proc:
            for reset in (False, True, False, True):
                with socket.create_connection(("127.0.0.1", proc.port), timeout=WAIT) as sock:
                    sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
                    if reset:
                        sock.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                        )

            def hung_up() -> list[str]:
                return [line for line in proc.log().splitlines() if "http.client_hung_up" in line]

            poll(lambda: len(hung_up()) >= 4 or "Traceback" in proc.log(), message="4 hang-ups")
            assert "Traceback" not in proc.log()
            assert not [line for line in proc.log().splitlines() if "level=warning" in line]
            assert len(hung_up()) == 4
            assert all("level=debug" in line for line in hung_up())


class TestStuckLoop:
    async def test_healthy_fails_while_the_loop_is_stuck(self, fresh_sandbox: Sandbox) -> None:
        """A loop blocked in synchronous work makes /-/healthy 503; /metrics still answers; then 200 again."""
        async with start_daemon(fresh_sandbox) as running:
            assert running.daemon.http is not None
            address = running.daemon.http.address
            assert (await asyncio.to_thread(http_get, address, "/-/healthy"))[0] == 200
            with ThreadPoolExecutor(2) as pool:
                healthy = pool.submit(http_get, address, "/-/healthy")
                metrics = pool.submit(http_get, address, "/metrics")
                # The daemon runs on this loop: waiting here synchronously stalls it, as hashing
                # a huge file on the loop did.
                status, body = healthy.result(timeout=WAIT)
                assert metrics.result(timeout=WAIT)[0] == 200
            assert status == 503, body
            assert b"event loop has not run" in body
            # Each probe awaits here, so the loop gets to run the callback that was waiting.
            async with asyncio.timeout(WAIT):
                while (await asyncio.to_thread(http_get, address, "/-/healthy"))[0] != 200:
                    pass

"""SIGHUP's reload, shared by user and host mode: load in a thread, keep the old on any error."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from provenanced.config import Settings
from provenanced.daemon.reload import changed, keeping, reload_on_request
from provenanced.errors import ConfigError

OLD = Settings(metrics={"listen": "127.0.0.1:1"}, host={"runtime_root": "/run/user"})
NEW = Settings(
    metrics={"listen": "127.0.0.1:2"},
    host={"runtime_root": "/elsewhere", "allow_users": ["alice"]},
    policy={"need_daemon_reload": "flag"},
)
KEYS = ("metrics", "log", "host.runtime_root")


@pytest.fixture
def notifications(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket standing in for systemd's notify socket."""
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.setblocking(False)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        yield sock


async def _received(sock: socket.socket) -> str:
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(10):
        return (await loop.sock_recv(sock, 4096)).decode()


class TestKeys:
    def test_changed_names_the_dotted_keys_that_differ(self) -> None:
        """Sections and single keys inside a section are compared alike."""
        assert changed(OLD, NEW, (*KEYS, "host.state_root", "policy")) == [
            "metrics",
            "host.runtime_root",
            "policy",
        ]

    def test_keeping_restores_only_the_named_keys(self) -> None:
        """The kept keys are the old ones; everything else (allow_users too) is the new one."""
        kept = keeping(NEW, OLD, KEYS)
        assert kept.metrics == OLD.metrics
        assert kept.host.runtime_root == "/run/user"
        assert kept.host.allow_users == ("alice",)
        assert kept.policy == NEW.policy


class TestReloadOnRequest:
    async def test_a_broken_configuration_changes_nothing(
        self, notifications: socket.socket
    ) -> None:
        """Loading fails: one error line, nothing applied, RELOADING=1 then READY=1 all the same."""
        applied: list[Settings] = []

        def broken() -> Settings:
            raise ConfigError("config.toml: invalid TOML")

        requested = asyncio.Event()
        with capture_logs() as logs:
            task = asyncio.create_task(
                reload_on_request(requested, broken, lambda: OLD, applied.append, KEYS)
            )
            try:
                requested.set()
                assert (await _received(notifications)).startswith("RELOADING=1\n")
                assert (await _received(notifications)).startswith("READY=1\n")
            finally:
                task.cancel()
        assert applied == []
        assert [(e["event"], e["log_level"]) for e in logs] == [("config.reload_failed", "error")]
        assert logs[0]["error"] == "config.toml: invalid TOML"

    async def test_a_good_one_is_applied_and_restart_keys_named(
        self, notifications: socket.socket
    ) -> None:
        """The loaded settings go to ``apply``; the restart keys that changed are logged."""
        applied: list[Settings] = []
        requested = asyncio.Event()
        with capture_logs() as logs:
            task = asyncio.create_task(
                reload_on_request(requested, lambda: NEW, lambda: OLD, applied.append, KEYS)
            )
            try:
                requested.set()
                await _received(notifications)
                assert (await _received(notifications)).startswith("READY=1\n")
            finally:
                task.cancel()
        assert applied == [NEW]
        events = {e["event"]: e for e in logs}
        assert events["config.restart_needed"]["sections"] == ["metrics", "host.runtime_root"]
        assert "config.reloaded" in events

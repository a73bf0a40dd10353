"""The user manager and the bus misbehave: the daemon stays up, reconnects and resyncs."""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Iterator

import pytest

from daemonkit import Running, eventually, settings_for, start_daemon, unit_file
from provenanced.model import FindingKind
from provenanced.sandbox import Sandbox

pytestmark = pytest.mark.fault


def _bus_down(sandbox: Sandbox) -> None:
    """Stop the sandbox's dbus-daemon and its activating socket: nobody answers on the bus."""
    sandbox.systemctl("stop", "dbus.socket", "dbus.service")


def _bus_answers(sandbox: Sandbox) -> bool:
    """Whether anything accepts connections on the bus socket (systemd leaves the file behind)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(sandbox.runtime_dir / "bus"))
        except OSError:
            return False
    return True


def _bus_up(sandbox: Sandbox) -> None:
    sandbox.systemctl("start", "dbus.socket")


@pytest.fixture
def bus_restored(fresh_sandbox: Sandbox) -> Iterator[Sandbox]:
    """Whatever a test does to the bus, the sandbox gets it back."""
    yield fresh_sandbox
    _bus_up(fresh_sandbox)


class TestUserBusRestart:
    async def test_on_the_bus_the_daemon_reconnects_and_resyncs(
        self, bus_restored: Sandbox
    ) -> None:
        """With manager.bus_address on the user bus, an outage disconnects; it reconnects and sees drift made meanwhile."""
        sandbox = bus_restored
        manager = {"bus_address": sandbox.bus_address, "reconnect_max_delay": 0.5}
        async with start_daemon(sandbox, settings_for(sandbox, manager)) as running:
            assert running.sample("provenanced_manager_transport_info", transport="explicit") == 1
            resyncs = running.engine.resyncs
            _bus_down(sandbox)
            await eventually(lambda: not running.engine.connected.is_set(), what="disconnect")
            assert running.sample("provenanced_manager_connected") == 0
            assert running.sample("provenanced_stale") == 1
            extra = unit_file(sandbox.config_dir, "made-during-outage.service")
            _bus_up(sandbox)
            await eventually(running.engine.connected.is_set, what="reconnect")
            await eventually(lambda: running.has(FindingKind.UNMANAGED_UNIT, extra))
            assert running.alive()
            assert running.engine.resyncs > resyncs
            assert running.sample("provenanced_dbus_reconnects_total") >= 1
            assert running.sample("provenanced_manager_connected") == 1
            assert running.sample("provenanced_stale") == 0
            # Nothing but the new file drifted: the tree is audited correctly after recovery.
            assert running.findings() == {("unmanaged-unit", extra.name, str(extra))}

    async def test_on_the_private_socket_a_bus_outage_does_not_matter(
        self, bus_restored: Sandbox
    ) -> None:
        """Over the manager's private socket (the default) the bus going away changes nothing."""
        sandbox = bus_restored
        async with start_daemon(sandbox) as running:
            assert running.sample("provenanced_manager_transport_info", transport="private") == 1
            _bus_down(sandbox)
            assert not _bus_answers(sandbox)
            extra = unit_file(sandbox.config_dir, "made-during-outage.service")
            await eventually(lambda: running.has(FindingKind.UNMANAGED_UNIT, extra))
            # The manager's own signals still arrive: a reload is followed by a resync.
            resyncs = running.engine.resyncs
            sandbox.daemon_reload()
            await eventually(lambda: running.engine.resyncs > resyncs, what="resync on reload")
            assert running.engine.connected.is_set()
            assert running.sample("provenanced_dbus_reconnects_total") == 0
            assert running.sample("provenanced_manager_connected") == 1


def _timeouts(running: Running, method: str) -> float:
    return running.sample("provenanced_dbus_calls_total", method=method, result="timeout")


class TestCallTimeout:
    async def test_stopped_manager_times_out_then_daemon_catches_up(
        self, fresh_sandbox: Sandbox
    ) -> None:
        """SIGSTOP the manager past call_timeout: calls time out, the daemon lives, and after SIGCONT it catches up."""
        sandbox = fresh_sandbox
        settings = settings_for(sandbox, {"call_timeout": 1.0, "reconnect_max_delay": 0.5})
        async with start_daemon(sandbox, settings) as running:
            pid = sandbox.manager_pid
            path = sandbox.config_dir / "backup.timer"
            target = os.readlink(path)
            os.kill(pid, signal.SIGSTOP)
            try:
                # The daemon re-reads the unit from the stopped manager; the manager itself
                # never signals anything about this change, so nothing else would bring it back.
                path.unlink()
                path.write_text("[Timer]\nOnCalendar=hourly\n")
                await eventually(
                    lambda: _timeouts(running, "GetAll") >= 1, what="a call timing out"
                )
                assert running.alive()
                # Connected, but the findings are behind: the metric says so.
                await eventually(lambda: running.sample("provenanced_stale") == 1, what="stale")
            finally:
                os.kill(pid, signal.SIGCONT)
            await eventually(lambda: running.has(FindingKind.LINK_REPLACED, path))
            assert running.alive() and running.engine.connected.is_set()
            assert running.sample("provenanced_manager_connected") == 1
            await eventually(lambda: running.sample("provenanced_stale") == 0, what="caught up")
            path.unlink()
            path.symlink_to(target)
            await eventually(lambda: not running.has(FindingKind.LINK_REPLACED, path))
            await eventually(lambda: running.findings() == set(), what="a clean tree again")

"""The D-Bus adapter against a real sandboxed user manager, over both transports."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from helpers import wait_until
from provenanced.errors import ManagerCallError, ManagerUnreachableError
from provenanced.model import UnitRecord
from provenanced.sandbox import Sandbox
from provenanced.systemd import manager
from provenanced.systemd.bus import (
    MANAGER_IFACE,
    PROPERTIES_IFACE,
    CallResult,
    ManagerConnection,
    Transport,
    resolve_address,
)
from provenanced.systemd.names import dropin_dirs_for, unit_object_path

pytestmark = pytest.mark.integration

EXAMPLE_UNITS = ("podman-web.service", "backup.service", "backup.timer")
HELD = "pvtest-held.service"
# Long enough for a loaded CI runner, short enough that a lost signal fails fast.
SIGNAL_WAIT = 15.0


def _transport(sandbox: Sandbox, kind: str) -> Transport:
    """Resolve the way the daemon does; hiding the runtime dir leaves only the session bus."""
    env = dict(sandbox.env)
    if kind == "bus":
        env["XDG_RUNTIME_DIR"] = ""
    transport = resolve_address(None, env)
    assert transport.kind == kind
    return transport


@pytest.fixture(params=["private", "bus"])
def transport(request: pytest.FixtureRequest, sandbox: Sandbox) -> Transport:
    """Each test runs over the private socket and over the user bus."""
    return _transport(sandbox, request.param)


@pytest.fixture
def calls() -> list[tuple[str, CallResult]]:
    """What the on_call hook saw."""
    return []


@pytest.fixture
async def conn(
    transport: Transport, calls: list[tuple[str, CallResult]]
) -> AsyncIterator[ManagerConnection]:
    """A connection recording every call outcome."""
    connection = await ManagerConnection.connect(
        transport, timeout=10.0, on_call=lambda method, result: calls.append((method, result))
    )
    yield connection
    await connection.close()


@pytest.fixture
def resume_manager(sandbox: Sandbox) -> Iterator[Callable[[], None]]:
    """SIGCONT for the manager, run again at teardown whatever the test did."""

    def resume() -> None:
        os.kill(sandbox.manager_pid, signal.SIGCONT)

    yield resume
    resume()


@pytest.fixture
def held_job(sandbox: Sandbox) -> Iterator[manager.JobSummary]:
    """A start job that stays running until teardown (a oneshot that never exits), as systemctl
    lists it."""
    unit = sandbox.admin_dir / HELD
    unit.write_text("[Service]\nType=oneshot\nExecStart=/bin/sleep infinity\n")
    sandbox.daemon_reload()
    sandbox.systemctl("start", "--no-block", HELD)
    try:
        listed = wait_until(
            lambda: re.search(
                rf"^(\d+) {re.escape(HELD)} start running$",
                sandbox.systemctl("list-jobs", "--no-legend").stdout,
                re.MULTILINE,
            ),
            message=f"{HELD}'s start job running",
        )
        job_id = int(listed.group(1))
        yield manager.JobSummary(
            job_id,
            HELD,
            "start",
            "running",
            f"/org/freedesktop/systemd1/job/{job_id}",
            unit_object_path(HELD),
        )
    finally:
        sandbox.systemctl("stop", HELD)
        unit.unlink()
        sandbox.daemon_reload()


def _show(sandbox: Sandbox, unit: str) -> dict[str, str]:
    """What ``systemctl --user show`` prints for the properties a UnitRecord carries."""
    return sandbox.show(
        unit,
        "FragmentPath",
        "DropInPaths",
        "NeedDaemonReload",
        "LoadState",
        "SourcePath",
        "UnitFileState",
        "InvocationID",
    )


def _as_shown(record: UnitRecord) -> dict[str, str]:
    """A record in systemctl's notation: lists space-separated, booleans yes/no."""
    return {
        "FragmentPath": record.fragment_path,
        "DropInPaths": " ".join(record.dropin_paths),
        "NeedDaemonReload": "yes" if record.need_daemon_reload else "no",
        "LoadState": record.load_state,
        "SourcePath": record.source_path,
        "UnitFileState": record.unit_file_state,
        "InvocationID": record.invocation_id,
    }


class TestConnect:
    """Both transports reach the same manager."""

    async def test_lists_units(self, conn: ManagerConnection, transport: Transport) -> None:
        """ListUnits over either transport sees the example units, typed."""
        units = {unit.name: unit for unit in await manager.list_units(conn)}
        assert {"podman-web.service", "backup.timer"} <= set(units)
        web = units["podman-web.service"]
        assert web.load_state == "loaded"
        assert web.path == unit_object_path("podman-web.service")
        assert conn.peer is (transport.kind == "private")

    async def test_repeated_private_connects(
        self, sandbox: Sandbox, held_job: manager.JobSummary
    ) -> None:
        """Every private-socket connect answers: the BEGIN+Hello stall of systemd 252 is gone."""
        transport = _transport(sandbox, "private")
        for _ in range(50):
            async with await ManagerConnection.connect(transport, timeout=5.0) as connection:
                assert held_job in await manager.list_jobs(connection)

    async def test_private_connects_during_a_signal_flood(
        self, sandbox: Sandbox, held_job: manager.JobSummary
    ) -> None:
        """Signals right behind the server's OK stay in the socket for the reader: every connect
        authenticates and its first call is answered while reloads flood the manager's signals."""
        transport = _transport(sandbox, "private")
        stop = threading.Event()

        def flood() -> None:
            while not stop.is_set():
                sandbox.daemon_reload()

        thread = threading.Thread(target=flood, name="reload-flood")
        thread.start()
        try:
            for _ in range(40):
                async with await ManagerConnection.connect(transport, timeout=5.0) as connection:
                    # A reload keeps queued jobs: the answer is the same running job each time.
                    assert held_job in await manager.list_jobs(connection)
        finally:
            stop.set()
            thread.join()

    async def test_close_after_cancelled_waiter(self, transport: Transport) -> None:
        """A cancelled wait_for_disconnect (engine shutdown) leaves close() working."""
        connection = await ManagerConnection.connect(transport)
        waiter = asyncio.ensure_future(connection.wait_for_disconnect())
        await asyncio.sleep(0)  # let the waiter start waiting before it is cancelled
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        async with asyncio.timeout(5):
            await connection.close()
            assert await connection.wait_for_disconnect() is None
        assert not connection.connected

    async def test_unreachable(self, tmp_path: Path) -> None:
        """An address nobody serves raises ManagerUnreachableError naming it."""
        address = f"unix:path={tmp_path}/no-manager-here"
        with pytest.raises(
            ManagerUnreachableError, match=f"unreachable at {re.escape(address)}"
        ) as caught:
            await ManagerConnection.connect(Transport(address, "explicit"), timeout=2.0)
        assert caught.value.exit_code == 3


class TestRecords:
    """Unit records agree with systemctl, which reads the same properties."""

    async def test_records_match_systemctl(self, conn: ManagerConnection, sandbox: Sandbox) -> None:
        """FragmentPath, DropInPaths, NeedDaemonReload, LoadState and friends match exactly."""
        records = await manager.get_unit_records(conn, EXAMPLE_UNITS)
        assert set(records) == set(EXAMPLE_UNITS)
        for name in EXAMPLE_UNITS:
            assert _as_shown(records[name]) == _show(sandbox, name), name
        assert (
            records["podman-web.service"]
            .dropin_paths[0]
            .endswith("podman-web.service.d/10-env.conf")
        )

    async def test_invalid_names_are_skipped(self, conn: ManagerConnection) -> None:
        """A name systemd would reject costs no call and yields no record."""
        records = await manager.get_unit_records(conn, ["not a unit", "backup.timer"])
        assert list(records) == ["backup.timer"]

    async def test_unit_path(self, conn: ManagerConnection, sandbox: Sandbox) -> None:
        """UnitPath is systemctl's, in the same priority order."""
        expected = tuple(sandbox.show(None, "UnitPath")["UnitPath"].split())
        assert await manager.unit_path(conn) == expected
        assert expected[0] == str(sandbox.admin_dir)

    async def test_load_unit(self, conn: ManagerConnection) -> None:
        """LoadUnit gives the unit's object path; a template cannot be loaded and gives None."""
        name = "never-installed.service"
        assert await manager.load_unit(conn, name) == unit_object_path(name)
        assert await manager.load_unit(conn, "podman-web@.service") is None

    async def test_dropin_dirs_match_the_manager(
        self, conn: ManagerConnection, sandbox: Sandbox
    ) -> None:
        """A drop-in in every directory dropin_dirs_for names shows up in DropInPaths."""
        name = "pvtest-a-b@x.service"
        (sandbox.admin_dir / "pvtest-a-b@.service").write_text(
            "[Service]\nType=oneshot\nExecStart=/bin/true\n"
        )
        created = []
        try:
            for index, directory in enumerate(dropin_dirs_for(name)):
                dropin = sandbox.admin_dir / directory / f"{index:02d}-pvtest.conf"
                dropin.parent.mkdir(exist_ok=True)
                dropin.write_text("[Unit]\nDocumentation=man:true(1)\n")
                created.append(dropin)
            await asyncio.to_thread(sandbox.daemon_reload)
            records = await manager.get_unit_records(conn, [name])
            assert records[name].dropin_paths == tuple(str(path) for path in created)
        finally:
            for dropin in created:
                dropin.unlink()
                dropin.parent.rmdir()
            (sandbox.admin_dir / "pvtest-a-b@.service").unlink()
            await asyncio.to_thread(sandbox.daemon_reload)


class TestSignals:
    """A subscribed connection receives job and reload signals, typed."""

    async def test_job_signals(self, conn: ManagerConnection, sandbox: Sandbox) -> None:
        """Starting backup.service yields JobNew, JobRemoved(done) and its PropertiesChanged."""
        seen: list[manager.ManagerEvent] = []
        done = asyncio.Event()

        def on_event(event: manager.ManagerEvent) -> None:
            seen.append(event)
            if isinstance(event, manager.JobRemoved) and event.unit == "backup.service":
                done.set()

        await manager.subscribe(conn, on_event)
        await asyncio.to_thread(sandbox.systemctl, "start", "backup.service")
        async with asyncio.timeout(SIGNAL_WAIT):
            await done.wait()
        new = [e for e in seen if isinstance(e, manager.JobNew) and e.unit == "backup.service"]
        removed = [
            e for e in seen if isinstance(e, manager.JobRemoved) and e.unit == "backup.service"
        ]
        assert len(new) == 1
        assert removed == [
            manager.JobRemoved(new[0].job_id, new[0].job_path, "backup.service", "done")
        ]
        unit_changes = [
            e
            for e in seen
            if isinstance(e, manager.PropertiesChanged)
            and e.unit_path == unit_object_path("backup.service")
            and "ActiveState" in e.changed
        ]
        assert unit_changes
        assert all(isinstance(e.changed["ActiveState"], str) for e in unit_changes)

    async def test_reloading(self, conn: ManagerConnection, sandbox: Sandbox) -> None:
        """daemon-reload yields Reloading(active=True) and then Reloading(active=False)."""
        states: list[bool] = []
        finished = asyncio.Event()

        def on_event(event: manager.ManagerEvent) -> None:
            if isinstance(event, manager.Reloading):
                states.append(event.active)
                if not event.active:
                    finished.set()

        await manager.subscribe(conn, on_event)
        await asyncio.to_thread(sandbox.daemon_reload)
        async with asyncio.timeout(SIGNAL_WAIT):
            await finished.wait()
        assert states == [True, False]

    async def test_unsubscribe(self, conn: ManagerConnection) -> None:
        """After unsubscribing, a handler hears nothing more, while others still do."""
        kept: list[manager.ManagerEvent] = []
        dropped: list[manager.ManagerEvent] = []
        finished = asyncio.Event()

        def keep(event: manager.ManagerEvent) -> None:
            kept.append(event)
            if event == manager.Reloading(active=False):
                finished.set()

        await manager.subscribe(conn, keep)
        stop = await manager.subscribe(conn, dropped.append)
        stop()
        await manager.reload(conn)
        async with asyncio.timeout(SIGNAL_WAIT):
            await finished.wait()
        assert kept
        assert dropped == []


class TestCalls:
    """Calls are bounded, reported to the hook, and fail as ManagerCallError."""

    async def test_many_concurrent_gets(
        self, conn: ManagerConnection, calls: list[tuple[str, CallResult]]
    ) -> None:
        """300 Gets at once stay under the in-flight bound instead of dying of EAGAIN."""
        replies = await asyncio.gather(
            *(
                conn.call("Get", "ss", [MANAGER_IFACE, "Version"], interface=PROPERTIES_IFACE)
                for _ in range(300)
            )
        )
        assert len({str(reply[0].value) for reply in replies}) == 1
        assert conn.connected
        assert calls.count(("Get", "ok")) == 300

    async def test_dbus_error(
        self, conn: ManagerConnection, calls: list[tuple[str, CallResult]]
    ) -> None:
        """A D-Bus error becomes ManagerCallError carrying the error name."""
        with pytest.raises(ManagerCallError, match="UnknownMethod") as caught:
            await conn.call("NoSuchMethod")
        assert caught.value.error_name == "org.freedesktop.DBus.Error.UnknownMethod"
        assert calls == [("NoSuchMethod", "error")]

    async def test_timeout_on_stopped_manager(
        self,
        conn: ManagerConnection,
        sandbox: Sandbox,
        calls: list[tuple[str, CallResult]],
        held_job: manager.JobSummary,
        resume_manager: Callable[[], None],
    ) -> None:
        """A manager that stopped answering turns a call into ManagerCallError, not a hang; once
        it runs again the same connection answers."""
        os.kill(sandbox.manager_pid, signal.SIGSTOP)
        try:
            with pytest.raises(ManagerCallError, match=r"no reply within 0\.2 s"):
                await conn.call("ListJobs", timeout=0.2)
        finally:
            resume_manager()
        assert calls == [("ListJobs", "timeout")]
        assert held_job in await manager.list_jobs(conn)

    async def test_list_jobs_idle(self, conn: ManagerConnection) -> None:
        """An idle manager has no jobs."""
        assert await manager.list_jobs(conn) == []

    async def test_list_jobs_pending(
        self, conn: ManagerConnection, held_job: manager.JobSummary
    ) -> None:
        """A running start job is listed with the id, type, state and paths systemctl shows."""
        assert await manager.list_jobs(conn) == [held_job]

    async def test_restart_and_result(self, conn: ManagerConnection, sandbox: Sandbox) -> None:
        """RestartUnit queues a job; afterwards the result facts match the run."""
        finished = asyncio.Event()
        results: dict[str, str] = {}

        def on_event(event: manager.ManagerEvent) -> None:
            if isinstance(event, manager.JobRemoved):
                results[event.job_path] = event.result
                finished.set()

        await manager.subscribe(conn, on_event)
        job = await manager.restart_unit(conn, "backup.service")
        assert job.startswith("/org/freedesktop/systemd1/job/")
        async with asyncio.timeout(SIGNAL_WAIT):
            while job not in results:
                await finished.wait()
                finished.clear()
        assert results[job] == "done"
        result = await manager.get_service_result(conn, "backup.service")
        assert (result.result, result.exec_main_code, result.exec_main_status) == ("success", 1, 0)
        assert result.condition_result and result.assert_result
        assert result.condition_timestamp > 0 and result.assert_timestamp > 0
        shown = await asyncio.to_thread(sandbox.show, "backup.service", "InvocationID")
        assert result.invocation_id == shown["InvocationID"] != ""
        timer = await manager.get_service_result(conn, "backup.timer")
        assert timer.result == "success"

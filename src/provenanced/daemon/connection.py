"""The connection to one user manager: followed with backoff, its signals turned into changes."""

from __future__ import annotations

import asyncio
import functools
import random
import time
from collections.abc import Awaitable, Callable, Mapping

import structlog

from provenanced.config import ManagerSettings
from provenanced.daemon.changes import Change, change_for_signal
from provenanced.daemon.jobs import JobVerifier
from provenanced.daemon.observer import Observer
from provenanced.errors import ManagerCallError, ManagerUnreachableError
from provenanced.model import JobChecks
from provenanced.sinks.journal import JournalSink
from provenanced.sinks.metrics import Telemetry
from provenanced.systemd import manager
from provenanced.systemd.bus import ManagerConnection, resolve_address

log = structlog.get_logger("provenanced.engine")

Verify = Callable[[ManagerConnection, manager.JobRemoved, JobChecks | None], None]


class ManagerLink:
    """One manager's connection, its observer and whether a reload is under way.

    ``follow`` connects, subscribes, lets ``resync`` read everything, and waits for the drop; on
    a drop it backs off with capped full jitter and tries again. Signals become changes on
    ``queue``; a finished service job goes to ``verify``.
    """

    def __init__(
        self,
        settings: Callable[[], ManagerSettings],
        env: Mapping[str, str],
        telemetry: Telemetry,
        journal: JournalSink,
        jobs: JobVerifier,
        observer_for: Callable[[ManagerConnection], Observer],
    ) -> None:
        self.conn: ManagerConnection | None = None
        self.observer: Observer | None = None  # None until subscribed: no partial re-read before
        self.transport = ""
        self.connected = asyncio.Event()
        self._settings = settings
        self._env = env
        self._telemetry = telemetry
        self._journal = journal
        self._jobs = jobs
        self._observer_for = observer_for
        self._reloading = False

    async def follow(
        self,
        resync: Callable[[], Awaitable[None]],
        queue: Callable[[Change], None],
        verify: Verify,
        changed: Callable[[], None],
    ) -> None:
        """Connect, subscribe, ``resync``, wait for the connection to drop; back off and repeat."""
        delay = 0.5
        while True:
            settings = self._settings()
            address = settings.bus_address or "(auto)"
            try:
                transport = resolve_address(settings.bus_address, self._env)
                address = transport.address
                self.conn = await ManagerConnection.connect(
                    transport,
                    timeout=settings.call_timeout,
                    max_in_flight=settings.max_in_flight,
                    on_call=self._telemetry.record_dbus_call,
                )
                self.transport, self._reloading = transport.kind, False
                self._jobs.connected()
                conn = self.conn
                await manager.subscribe(
                    conn, functools.partial(self._on_signal, conn, queue, verify)
                )
                self.observer = self._observer_for(conn)
                await resync()
                self.connected.set()
                changed()
                log.info("manager.connected", address=address, transport=transport.kind)
                delay = 0.5
                await conn.wait_for_disconnect()
                log.warning("manager.disconnected", address=address)
            except (ManagerUnreachableError, ManagerCallError) as exc:
                log.warning("manager.unreachable", address=address, error=str(exc))
            await self._lost(address)
            changed()
            await asyncio.sleep(random.uniform(0, delay))
            delay = min(delay * 2, settings.reconnect_max_delay)

    async def close(self) -> None:
        """Close the connection, if any."""
        if self.conn is not None:
            await self.conn.close()
        self.conn = self.observer = None

    async def _lost(self, address: str) -> None:
        if self.connected.is_set():
            self._journal.send_connection_lost(address, "connection closed")
        self.connected.clear()
        self._telemetry.record_reconnect()
        await self.close()

    def _on_signal(
        self,
        conn: ManagerConnection,
        queue: Callable[[Change], None],
        verify: Verify,
        event: manager.ManagerEvent,
    ) -> None:
        announced = self._jobs.observe(event)
        if isinstance(event, manager.Reloading):
            self._reloading = event.active
        change = change_for_signal(event, self._reloading, time.monotonic())
        if change is not None:
            queue(change)
        elif isinstance(event, manager.JobRemoved) and self._jobs.wants(event):
            verify(conn, event, announced)

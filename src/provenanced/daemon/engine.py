"""One user manager followed: changes in, one re-read, the state updated, alerts and actions out."""

from __future__ import annotations

import asyncio
import contextlib
import os
import posixpath
import random
import time
from collections import Counter
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import replace
from typing import Any

import structlog

from provenanced.config import Settings
from provenanced.core.layered import LayeredMap
from provenanced.core.sources import is_vendor_source, quadlet_source_dirs
from provenanced.core.state import AuditState
from provenanced.daemon.actions import Actions
from provenanced.daemon.changes import (
    BaselineChanged,
    Change,
    FullResync,
    PathChanged,
    WatchedPlaces,
    change_for_signal,
    change_for_watch_event,
)
from provenanced.daemon.heal import Healer
from provenanced.daemon.observer import Observer, baseline_facts, user_dirs
from provenanced.errors import ManagerCallError, ManagerUnreachableError, StateError
from provenanced.expect import baseline
from provenanced.expect.generation import GCROOT
from provenanced.expect.packages import open_database
from provenanced.fs.facts import FactReader
from provenanced.fs.watch import Overflow, UnitDirWatcher, WatchEvent, WatchLimitReached
from provenanced.model import (
    DaemonStatus,
    JobChecks,
    Observation,
    Transition,
    UnitRecord,
    frozen_map,
)
from provenanced.sinks.alerts import Alerts
from provenanced.sinks.journal import JournalSink
from provenanced.sinks.metrics import Telemetry
from provenanced.systemd import manager
from provenanced.systemd.bus import ManagerConnection, resolve_address
from provenanced.systemd.checks import ChecksSeen

log = structlog.get_logger("provenanced.engine")

# Pause before retrying a re-check the manager failed, so an erroring manager is not hammered.
_RETRY_DELAY = 1.0


class _Shutdown(Exception):
    """Raised inside the task group to end it when ``stop`` is set."""


class _LoadStates:
    """Units by LoadState, counted once per full observation and then adjusted by each change."""

    def __init__(self) -> None:
        self._base: Mapping[str, UnitRecord] | None = None
        self._base_counts: Counter[str] = Counter()

    def count(self, units: Mapping[str, UnitRecord]) -> Mapping[str, int]:
        base, layer = (units.base, units.layer()) if isinstance(units, LayeredMap) else (units, ())
        if base is not self._base:
            self._base, self._base_counts = base, Counter(u.load_state for u in base.values())
        counts = self._base_counts.copy()
        for name, record in layer:
            old = base.get(name)
            if old is not None:
                counts[old.load_state] -= 1
            if record is not None:
                counts[record.load_state] += 1
        return frozen_map({state: n for state, n in counts.items() if n > 0})


class Engine:
    """Follows one user manager: its connection, its watches, its state, its alerts and actions."""

    def __init__(
        self,
        settings: Settings,
        telemetry: Telemetry,
        journal: JournalSink,
        env: Mapping[str, str] = os.environ,
    ) -> None:
        self.settings = settings
        self.telemetry = telemetry
        self.env = dict(env)
        self.dirs = user_dirs(env)
        self.state_dir = settings.resolved_state_dir(env)
        self.state = AuditState(settings.provenance.managed_roots)
        self.alerts = Alerts(journal, telemetry, settings.policy.alert_min_interval)
        healer = Healer(self.state_dir, self.dirs.home)
        self.actions = Actions(settings.policy, healer, telemetry, journal)
        self.ready = asyncio.Event()
        self.connected = asyncio.Event()
        self.status = DaemonStatus()
        self._load_states = _LoadStates()
        self.resyncs = 0
        self._changes: asyncio.Queue[Change] = asyncio.Queue()
        self._conn: ManagerConnection | None = None
        self._observer: Observer | None = None
        self._reader = FactReader()  # its hash cache outlives connections
        self._watcher: UnitDirWatcher | None = None
        self._degraded = asyncio.Event()  # the watcher ran out of watches: shorten the backstop
        self._transport = ""
        self._manager_reloading = False
        self._checks = ChecksSeen()
        self._behind = False  # a re-read failed; the findings wait for its retry
        # One re-read at a time: a partial one started from the observation a concurrent full
        # resync (a reconnect) replaces would land after it and undo it.
        self._reading = asyncio.Lock()
        self._baseline_stamp: tuple[int, int, int, int] | None = None
        gcroots = posixpath.dirname(posixpath.join(self.dirs.home, GCROOT))
        provenance = settings.provenance
        # Outlives connections, like the hash cache: it re-reads only the info files that changed.
        self._packages = open_database(provenance.packages, provenance.package_root)
        packages_dir, packages_files = (
            self._packages.watched if self._packages is not None else (None, frozenset[str]())
        )
        self._places = WatchedPlaces(
            self.state_dir, baseline.BASELINE_FILE, gcroots, packages_dir, packages_files
        )
        self._tg: asyncio.TaskGroup | None = None
        self._heal_retry_due = False  # a deferred heal's next look is already scheduled

    async def run(self, stop: asyncio.Event) -> None:
        """Run every loop until ``stop`` is set; a crashed loop ends the engine."""
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                tg.create_task(self.follow_manager(), name="manager.follow")
                tg.create_task(self.reconcile_changes(), name="engine.reconcile")
                tg.create_task(self.alerts.send_held(), name="alerts.flush")
                reloads = self.actions.reload_when_stale(self.state, lambda: self._conn)
                tg.create_task(reloads, name="actions.reload")
                tg.create_task(self.resync_periodically(), name="engine.backstop")
                await stop.wait()
                raise _Shutdown
        except* _Shutdown:
            pass
        finally:
            if self._watcher is not None:
                self._watcher.close()
            if self._conn is not None:
                await self._conn.close()

    def follow_settings(self, settings: Settings) -> None:
        """Take a reloaded configuration's policy and provenance sections, and look again."""
        if settings.provenance != self.settings.provenance:
            provenance = settings.provenance
            self.state.follow_roots(provenance.managed_roots)
            # Watched places stay as they were: a database added here is read at each resync.
            self._packages = open_database(provenance.packages, provenance.package_root)
            if self._observer is not None:
                self._observer.managed_roots = provenance.managed_roots
                self._observer.read_home_manager = provenance.home_manager
                self._observer.packages = self._packages
                self._observer.system_root = provenance.package_root
        self.settings = settings
        self.alerts.gate.interval = settings.policy.alert_min_interval
        self.actions.follow_policy(settings.policy)
        self._changes.put_nowait(FullResync("config reloaded", time.monotonic()))

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        """Start a task inside the engine's task group, so a crash in it ends the engine too."""
        assert self._tg is not None, "the engine is not running"
        try:
            self._tg.create_task(coro, name=name)
        except RuntimeError:
            # The group is shutting down (a late job signal during stop): nothing left to do.
            coro.close()

    def publish(self) -> None:
        """Swap in a new immutable status for the HTTP thread."""
        obs = self.state.observation
        self.status = DaemonStatus(
            findings=tuple(self.state.findings.values()),
            units_by_load_state=self._load_states.count(obs.units if obs else frozen_map()),
            manager_connected=self.connected.is_set(),
            transport=self._transport,
            ready=self.ready.is_set(),
            behind=self._behind or not self.connected.is_set(),
            degraded=bool(self._watcher and self._watcher.degraded),
            inotify_watches=self._watcher.watch_count if self._watcher else 0,
            last_full_resync=self.status.last_full_resync,
            units_audited=len(obs.units) if obs else 0,
        )

    # ---- the manager -----------------------------------------------------------------------

    async def follow_manager(self) -> None:
        """Connect, subscribe, resync, wait for the connection to drop; back off and repeat."""
        delay, cap = 0.5, self.settings.manager.reconnect_max_delay
        while True:
            address = self.settings.manager.bus_address or "(auto)"
            try:
                transport = resolve_address(self.settings.manager.bus_address, self.env)
                address = transport.address
                conn = await ManagerConnection.connect(
                    transport,
                    timeout=self.settings.manager.call_timeout,
                    max_in_flight=self.settings.manager.max_in_flight,
                    on_call=self.telemetry.record_dbus_call,
                )
                self._conn, self._transport = conn, transport.kind
                self._manager_reloading = False
                self._checks = ChecksSeen()  # jobs in flight on an old connection are unknown
                await manager.subscribe(conn, self._on_signal)
                provenance = self.settings.provenance
                self._observer = Observer(
                    conn,
                    self.dirs,
                    provenance.managed_roots,
                    provenance.home_manager,
                    self._reader,
                    self._packages,
                    provenance.package_root,
                )
                await self._reread([FullResync("connected", time.monotonic(), True)])
                self.connected.set()
                self.publish()
                log.info("manager.connected", address=address, transport=transport.kind)
                delay = 0.5
                await conn.wait_for_disconnect()
                log.warning("manager.disconnected", address=address)
            except (ManagerUnreachableError, ManagerCallError) as exc:
                log.warning("manager.unreachable", address=address, error=str(exc))
            if self.connected.is_set():
                self.alerts.journal.send_connection_lost(address, "connection closed")
            self.connected.clear()
            self.telemetry.record_reconnect()
            if self._conn is not None:
                await self._conn.close()
                self._conn = self._observer = None
            self.publish()
            # Capped full jitter: many daemons restarting with one manager do not stampede it.
            await asyncio.sleep(random.uniform(0, delay))
            delay = min(delay * 2, cap)

    def _on_signal(self, event: manager.ManagerEvent) -> None:
        announced = self._checks.observe(event)
        if isinstance(event, manager.Reloading):
            self._manager_reloading = event.active
        change = change_for_signal(event, self._manager_reloading, time.monotonic())
        if change is not None:
            self._changes.put_nowait(change)
        elif (
            isinstance(event, manager.JobRemoved)
            and event.unit.endswith(".service")
            and event.result == "done"
            and self._conn is not None
        ):
            # Verification needs D-Bus reads; it runs as its own small task of the loop.
            self._spawn(self._verify_job(event, announced), "jobs.verify")

    async def _verify_job(self, event: manager.JobRemoved, announced: JobChecks | None) -> None:
        conn = self._conn
        if conn is None:
            return
        try:
            result = await manager.get_service_result(conn, event.unit)
        except ManagerCallError:
            return
        opened, transitions = self.state.record_job(
            event.unit, event.job_id, event.result, result, time.time(), announced
        )
        if opened is not None:
            self.telemetry.record_job_unverified()
            self.alerts.journal.send_job_unverified(opened)
        self._after(transitions)

    # ---- files -----------------------------------------------------------------------------

    def _start_watching(self, obs: Observation) -> None:
        roots = tuple(d.path for d in obs.unit_dirs)
        if self._watcher is not None and self._watcher.roots == roots:
            degraded = self._watcher.degraded
            self._watcher.refresh()
            if degraded and not self._watcher.degraded:
                log.info("inotify.watches_restored", watches=self._watcher.watch_count)
            return
        if self._watcher is not None:
            self._watcher.close()
        # Generated units' sources: a change there re-reads the units whose SourcePath it is.
        # The distribution's are vouched for by construction: watching /usr/share buys nothing.
        sources = [
            d for d in quadlet_source_dirs(self.dirs, os.getuid()) if not is_vendor_source(d)
        ]
        self._watcher = UnitDirWatcher(roots, [*self._places.extra_dirs, *sources])
        self._watcher.refresh()
        self._spawn(self._watch_files(self._watcher), "fs.watch")

    async def _watch_files(self, watcher: UnitDirWatcher) -> None:
        with contextlib.suppress(ValueError, OSError):  # the watcher was closed and replaced
            async for event in watcher.events():
                self._on_watch_event(event)

    def _on_watch_event(self, event: WatchEvent) -> None:
        if isinstance(event, Overflow):
            self.telemetry.record_overflow()
        elif isinstance(event, WatchLimitReached):
            log.warning(
                "inotify.watch_limit",
                path=event.path,
                fallback_interval=self.settings.policy.degraded_resync_interval,
            )
            self._degraded.set()
            self.publish()
        change = change_for_watch_event(event, self._places)
        if isinstance(change, PathChanged):
            self.actions.last_change = time.monotonic()
        if change is not None:
            self._changes.put_nowait(change)

    # ---- the loop --------------------------------------------------------------------------

    async def reconcile_changes(self) -> None:
        """Drain queued changes in one batch and re-read the least that covers them."""
        while True:
            batch = [await self._changes.get()]
            while not self._changes.empty():
                batch.append(self._changes.get_nowait())
            if self._observer is None or self.state.observation is None:
                continue  # not connected (or still subscribing): the connect's full resync follows
            started = min(
                (c.monotonic for c in batch if not isinstance(c, BaselineChanged)), default=None
            )
            try:
                await self._reread(batch)
            except ManagerCallError as exc:
                log.warning("engine.resync_failed", error=str(exc), retry_in=_RETRY_DELAY)
                self._behind = True
                self.publish()
                # The batch's changes are not reflected yet, and nothing else would bring them
                # back before the backstop (a slow manager sends no signal): retry in full.
                await asyncio.sleep(_RETRY_DELAY)
                self._changes.put_nowait(
                    FullResync("retry after a failed re-check", time.monotonic())
                )
                continue
            if started is not None:
                self.telemetry.observe_detection_latency(time.monotonic() - started)

    async def _reread(self, batch: Sequence[Change]) -> None:
        """Re-read what ``batch`` touched, update the state, and let alerts and actions follow."""
        observer = self._observer
        assert observer is not None, "re-read without a connection"
        started = time.monotonic()
        async with self._reading:
            reading = await observer.read(batch, self.state.observation)
            full = reading.touched is None
            if full:
                self._start_watching(reading.observation)
            if full or any(isinstance(c, BaselineChanged) for c in batch):
                self._read_baseline(reading.observation)
            transitions = self.state.update(reading, time.time())
        if full:
            self._resynced(batch, time.monotonic() - started)
        self._after(transitions)

    def _after(self, transitions: list[Transition]) -> None:
        self.alerts.send(transitions)
        outcomes = self.actions.consider(self.state)
        if any(outcome.ok for outcome in outcomes):
            # The placed links raise inotify events of their own; this makes sure a resync follows.
            self._changes.put_nowait(FullResync("healed", time.monotonic()))
        waits = [o.retry_in for o in outcomes if o.retry_in is not None]
        if waits and not self._heal_retry_due:
            # A heal waits for its file to be quiet, and no event need come then: look again.
            self._heal_retry_due = True
            self._spawn(self._consider_again(min(waits)), "actions.heal_retry")
        self.publish()

    async def _consider_again(self, delay: float) -> None:
        await asyncio.sleep(delay)
        self._heal_retry_due = False
        self._after([])

    def _resynced(self, batch: Sequence[Change], duration: float) -> None:
        self.resyncs += 1
        self._behind = False
        self.telemetry.observe_resync(duration)
        self.status = replace(self.status, last_full_resync=time.time())
        self.ready.set()
        reasons = sorted({c.reason for c in batch if isinstance(c, FullResync)}) or [
            "a unit directory changed"
        ]
        log.debug(
            "engine.resynced",
            reason=", ".join(reasons),
            units=len(self.state.observation.units) if self.state.observation else 0,
            seconds=round(duration, 4),
        )

    def _read_baseline(self, obs: Observation) -> None:
        """Load the accepted baseline when it changed (record one from ``obs`` when there is none)."""
        stamp = baseline.baseline_stamp(self.state_dir)
        if stamp is not None and stamp == self._baseline_stamp:
            return  # unchanged since last read: keep it, and the expectations built on it
        try:
            accepted = baseline.load_baseline(self.state_dir)
        except StateError as exc:
            log.error("baseline.unreadable", error=str(exc))
            return
        if accepted is None:
            accepted = baseline.entries_from_facts(baseline_facts(obs))
            try:
                path = baseline.save_baseline(self.state_dir, accepted)
                log.info("baseline.recorded", path=path, files=len(accepted))
            except StateError as exc:
                log.error("baseline.unwritable", error=str(exc))
        self.state.accept_baseline(accepted)
        # Stamped before the read, so a write racing it is read again next time.
        self._baseline_stamp = stamp or baseline.baseline_stamp(self.state_dir)

    async def resync_periodically(self) -> None:
        """The backstop: a jittered full resync, more often in degraded (no watches) mode."""
        while True:
            policy = self.settings.policy
            degraded = bool(self._watcher and self._watcher.degraded)
            interval = policy.degraded_resync_interval if degraded else policy.resync_interval
            # Losing the watches shortens the interval now, not after a sleep of the old length.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval * random.uniform(0.9, 1.1)):
                    await self._degraded.wait()
                    self._degraded.clear()
                    continue
            self._changes.put_nowait(FullResync("backstop", time.monotonic()))

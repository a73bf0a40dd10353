"""The daemon's state and time: events in, the smallest re-check, transitions out to sinks and actions."""

from __future__ import annotations

import asyncio
import contextlib
import os
import posixpath
import random
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, replace
from typing import Any

import structlog

from provenanced import notify
from provenanced.actions import Healer, ReloadGate, reload_manager
from provenanced.config import Settings
from provenanced.errors import ManagerCallError, ManagerUnreachableError, StateError
from provenanced.expect import baseline
from provenanced.expect.homemanager import GCROOT
from provenanced.fs.watch import (
    Overflow,
    PathChanged,
    UnitDirWatcher,
    WatchEvent,
    WatchLimitReached,
)
from provenanced.model import (
    DaemonStatus,
    FileFact,
    Finding,
    FindingKind,
    Observation,
    Transition,
    frozen_map,
)
from provenanced.observe import Observer, baseline_facts, user_dirs
from provenanced.sinks.journal import JournalSink
from provenanced.sinks.metrics import Telemetry
from provenanced.systemd import manager
from provenanced.systemd.bus import ManagerConnection, resolve_address
from provenanced.tracker import Changed, FullResyncNeeded, Tracker
from provenanced.transitions import AlertGate, Key, diff
from provenanced.verify import JobTracker

log = structlog.get_logger("provenanced.engine")


# Pause before retrying a re-check the manager failed, so an erroring manager is not hammered.
_RETRY_DELAY = 1.0


_FileIdentity = tuple[object, ...] | None


def _identity(fact: FileFact | None) -> _FileIdentity:
    """What tells one version of a file from the next (what a heal re-checks before acting)."""
    if fact is None:
        return None
    return (fact.kind, fact.inode, fact.mtime_ns, fact.sha256, fact.target)


class _Shutdown(Exception):
    """Raised inside the task group to end it when ``stop`` is set."""


@dataclass(frozen=True, slots=True)
class FullResync:
    """Re-read everything: start-up, reconnect, overflow, reload, a new generation, the backstop."""

    reason: str
    monotonic: float
    reference: bool = False  # the manager just (re)loaded: retake the definition hashes


@dataclass(frozen=True, slots=True)
class UnitsChanged:
    """The manager loaded a unit (re-read it) or unloaded it (forget it, never re-read it).

    Reading an unloaded unit by its object path would load it again, and the manager would
    unload it again: a loop of D-Bus calls on an idle system.
    """

    name: str
    monotonic: float
    removed: bool = False


@dataclass(frozen=True, slots=True)
class BaselineChanged:
    """``baseline.json`` was rewritten (``provenanced baseline accept``)."""


Change = PathChanged | FullResync | UnitsChanged | BaselineChanged


class Engine:
    """Owns the open findings and every long-running loop; the tracker owns what is observed."""

    def __init__(
        self,
        settings: Settings,
        telemetry: Telemetry,
        journal: JournalSink,
        env: Mapping[str, str] = os.environ,
        load_settings: Callable[[], Settings] | None = None,
    ) -> None:
        self.settings = settings
        self.telemetry = telemetry
        self.journal = journal
        self.env = dict(env)
        self._load_settings = load_settings
        self.dirs = user_dirs(env)
        self.state_dir = settings.resolved_state_dir(env)
        self.ready = asyncio.Event()
        self.connected = asyncio.Event()
        self.status = DaemonStatus()
        self._changes: asyncio.Queue[Change] = asyncio.Queue()
        self._conn: ManagerConnection | None = None
        self.tracker = Tracker()
        self._findings: dict[Key, Finding] = {}
        self._jobs = JobTracker()
        self._gate = AlertGate(settings.policy.alert_min_interval)
        self._reload_gate = ReloadGate(settings.policy)
        self._healer = Healer(self.state_dir, self.dirs.home)
        self._alerts_due = asyncio.Event()
        self._stale = asyncio.Event()
        self._degraded = asyncio.Event()  # the watcher ran out of watches: shorten the backstop
        self._heal_tried: dict[Key, _FileIdentity] = {}
        self._watcher: UnitDirWatcher | None = None
        self._last_change = time.monotonic()
        self._transport = ""
        self._manager_reloading = False
        self._behind = False  # a re-check failed; the findings wait for its retry
        # One re-read at a time: a partial one started from the observation a concurrent full
        # resync (a reconnect) replaces would land after it and undo it.
        self._reading = asyncio.Lock()
        self._baseline_stamp: tuple[int, int, int, int] | None = None
        self.resyncs = 0
        self._tg: asyncio.TaskGroup | None = None

    # ---- lifecycle -------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, reload_config: asyncio.Event | None = None) -> None:
        """Run every loop until ``stop`` is set; a crashed loop ends the daemon (systemd restarts it)."""
        reload_config = reload_config or asyncio.Event()
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                tg.create_task(self.follow_manager(), name="manager.follow")
                tg.create_task(self.reconcile_changes(), name="engine.reconcile")
                tg.create_task(self.send_held_alerts(), name="alerts.flush")
                tg.create_task(self.reload_when_stale(), name="actions.reload")
                tg.create_task(self.resync_periodically(), name="engine.backstop")
                tg.create_task(self.reload_config_on_signal(reload_config), name="config.reload")
                interval = notify.watchdog_interval(self.env)
                if interval:
                    tg.create_task(notify.keep_watchdog_fed(interval), name="notify.watchdog")
                await stop.wait()
                raise _Shutdown
        except* _Shutdown:
            pass
        finally:
            notify.stopping()
            if self._watcher is not None:
                self._watcher.close()
            if self._conn is not None:
                await self._conn.close()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        """Start a task inside the engine's task group, so a crash in it ends the daemon too."""
        assert self._tg is not None, "the engine is not running"
        try:
            self._tg.create_task(coro, name=name)
        except RuntimeError:
            # The group is shutting down (a late job signal during stop): nothing left to do.
            coro.close()

    def publish(self) -> None:
        """Swap in a new immutable status for the HTTP thread."""
        obs = self.tracker.obs
        load_states: dict[str, int] = {}
        for unit in obs.units.values() if obs else ():
            load_states[unit.load_state] = load_states.get(unit.load_state, 0) + 1
        self.status = DaemonStatus(
            findings=tuple(self._findings.values()),
            units_by_load_state=frozen_map(load_states),
            manager_connected=self.connected.is_set(),
            transport=self._transport,
            ready=self.ready.is_set(),
            stale=self._behind or not self.connected.is_set(),
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
                await manager.subscribe(conn, self._on_signal)
                self.tracker.observer = Observer(
                    conn,
                    self.dirs,
                    self.settings.provenance.managed_roots,
                    read_home_manager=self.settings.provenance.home_manager,
                    reader=self.tracker.observer.reader if self.tracker.observer else None,
                )
                await self.full_resync("connected", reference=True)
                self.connected.set()
                self.publish()
                log.info("manager.connected", address=address, transport=transport.kind)
                delay = 0.5
                await conn.wait_for_disconnect()
                log.warning("manager.disconnected", address=address)
            except (ManagerUnreachableError, ManagerCallError) as exc:
                log.warning("manager.unreachable", address=address, error=str(exc))
            if self.connected.is_set():
                self.journal.send_connection_lost(address, "connection closed")
            self.connected.clear()
            self.telemetry.record_reconnect()
            if self._conn is not None:
                await self._conn.close()
                self._conn = None
            self.publish()
            # Capped full jitter: many daemons restarting with one manager do not stampede it.
            await asyncio.sleep(random.uniform(0, delay))
            delay = min(delay * 2, cap)

    def _on_signal(self, event: manager.ManagerEvent) -> None:
        if isinstance(event, manager.Reloading):
            self._manager_reloading = event.active
            if not event.active:
                self._changes.put_nowait(
                    FullResync("manager reloaded", time.monotonic(), reference=True)
                )
        elif isinstance(event, manager.ManagerOwnerChanged):
            self._changes.put_nowait(
                FullResync("manager restarted", time.monotonic(), reference=True)
            )
        elif isinstance(event, manager.JobNew):
            self._jobs.started(event)
        elif isinstance(event, manager.JobRemoved):
            self._jobs.finished(event)
            if (
                event.unit.endswith(".service")
                and event.result == "done"
                and self._conn is not None
            ):
                # Verification needs D-Bus reads; it runs as its own small task of the loop.
                self._spawn(self._verify_job(event), "jobs.verify")
        elif isinstance(event, manager.UnitNew | manager.UnitRemoved):
            if self._manager_reloading:
                # A reload frees and re-creates every unit; the resync at its end covers them.
                return
            removed = isinstance(event, manager.UnitRemoved)
            self._changes.put_nowait(UnitsChanged(event.name, time.monotonic(), removed))

    async def _verify_job(self, event: manager.JobRemoved) -> None:
        conn = self._conn
        if conn is None:
            return
        try:
            result = await manager.get_service_result(conn, event.unit)
        except ManagerCallError:
            return
        finding = self._jobs.judge(event, result)
        if finding is not None:
            self.telemetry.record_job_unverified()
            self.journal.send_job_unverified(finding)
        if self.tracker.obs is not None:
            self._apply(self.tracker.obs, ((), ()))  # only the job findings changed
            self.publish()

    # ---- files -----------------------------------------------------------------------------

    def _start_watching(self, obs: Observation) -> None:
        roots = [d.path for d in obs.unit_dirs]
        extra = [posixpath.dirname(posixpath.join(self.dirs.home, GCROOT)), self.state_dir]
        if self._watcher is not None and self._watcher.roots == tuple(roots):
            degraded = self._watcher.degraded
            self._watcher.refresh()
            if degraded and not self._watcher.degraded:
                log.info("inotify.watches_restored", watches=self._watcher.watch_count)
            return
        if self._watcher is not None:
            self._watcher.close()
        self._watcher = UnitDirWatcher(roots, extra)
        self._watcher.refresh()
        watcher = self._watcher
        self._spawn(self._watch_files(watcher), "fs.watch")

    async def _watch_files(self, watcher: UnitDirWatcher) -> None:
        with contextlib.suppress(ValueError, OSError):  # the watcher was closed and replaced
            async for event in watcher.events():
                self._on_watch_event(event)

    def _on_watch_event(self, event: WatchEvent) -> None:
        if isinstance(event, Overflow):
            self.telemetry.record_overflow()
            self._changes.put_nowait(FullResync("inotify overflow", event.monotonic))
        elif isinstance(event, WatchLimitReached):
            log.warning(
                "inotify.watch_limit",
                path=event.path,
                fallback_interval=self.settings.policy.degraded_resync_interval,
            )
            self._degraded.set()
            self.publish()
        elif posixpath.dirname(event.path) == self.state_dir:
            if posixpath.basename(event.path) == baseline.BASELINE_FILE:
                self._changes.put_nowait(BaselineChanged())
        elif event.path.startswith(posixpath.dirname(posixpath.join(self.dirs.home, GCROOT))):
            self._changes.put_nowait(FullResync("home manager generation changed", event.monotonic))
        else:
            self._last_change = time.monotonic()
            self._changes.put_nowait(event)

    # ---- reconcile -------------------------------------------------------------------------

    async def reconcile_changes(self) -> None:
        """Drain queued changes in one batch and apply the smallest re-check that covers them."""
        while True:
            batch = [await self._changes.get()]
            while not self._changes.empty():
                batch.append(self._changes.get_nowait())
            if self._conn is None or self.tracker.obs is None:
                continue  # the reconnect does a full resync anyway
            started = min(
                (c.monotonic for c in batch if not isinstance(c, BaselineChanged)), default=None
            )
            try:
                if any(isinstance(c, FullResync) for c in batch):
                    reasons = sorted({c.reason for c in batch if isinstance(c, FullResync)})
                    reference = any(c.reference for c in batch if isinstance(c, FullResync))
                    await self.full_resync(", ".join(reasons), reference=reference)
                else:
                    if any(isinstance(c, BaselineChanged) for c in batch):
                        self._read_baseline()
                    paths = {c.path: c.is_dir for c in batch if isinstance(c, PathChanged)}
                    names = {c.name: c.removed for c in batch if isinstance(c, UnitsChanged)}
                    await self._resync_paths(paths, names)
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

    async def full_resync(self, reason: str, reference: bool = False) -> None:
        """Re-read the manager, every audited file and the expectations."""
        async with self._reading:
            started = time.monotonic()
            obs = await self.tracker.read_all(reference)
            self._read_baseline(obs)
            self._start_watching(obs)
            self._apply(obs)
        self.resyncs += 1
        self._behind = False
        duration = time.monotonic() - started
        self.telemetry.observe_resync(duration)
        self.status = replace(self.status, last_full_resync=time.time())
        if not self.ready.is_set():
            self.ready.set()
            notify.ready(f"watching {len(obs.units)} units")
        self.publish()
        log.debug(
            "engine.resynced", reason=reason, units=len(obs.units), seconds=round(duration, 4)
        )

    async def _resync_paths(
        self, changed: Mapping[str, bool], names: Mapping[str, bool] | None = None
    ) -> None:
        """Re-read the changed paths and the units they can affect; ``names``: unit → unloaded."""
        async with self._reading:
            try:
                obs, touched = await self.tracker.read_changes(changed, names or {})
            except FullResyncNeeded as exc:
                reason = str(exc)
            else:
                self._apply(obs, touched)
                self.publish()
                return
        await self.full_resync(reason)

    def _read_baseline(self, obs: Observation | None = None) -> None:
        """Load the accepted baseline (record one from ``obs`` when there is none yet)."""
        stamp = baseline.baseline_stamp(self.state_dir)
        if obs is not None and stamp is not None and stamp == self._baseline_stamp:
            return  # unchanged since last read: keep it, and the expectations built on it
        try:
            accepted = baseline.load_baseline(self.state_dir)
        except StateError as exc:
            log.error("baseline.unreadable", error=str(exc))
            return
        if accepted is None and obs is not None:
            accepted = baseline.entries_from_facts(baseline_facts(obs))
            try:
                path = baseline.save_baseline(self.state_dir, accepted)
                log.info("baseline.recorded", path=path, files=len(accepted))
            except StateError as exc:
                log.error("baseline.unwritable", error=str(exc))
        if accepted is not None:
            self.tracker.accept_baseline(accepted)
            # Stamped before the read, so a write racing it is read again next time.
            self._baseline_stamp = stamp or baseline.baseline_stamp(self.state_dir)
        if obs is None and self.tracker.obs is not None:
            self._apply(self.tracker.obs)
            self.publish()

    def _apply(self, obs: Observation, changed: Changed | None = None) -> None:
        """Judge ``obs``: in full, or only the ``(paths, units)`` that changed since the last one."""
        found = list(self.tracker.judge(obs, changed))
        found.extend(self._jobs.findings())
        self._findings, transitions = diff(self._findings, found, time.time())
        for transition in transitions:
            self.telemetry.record_transition(transition)
            log.info(
                f"drift.{transition.state}",
                kind=transition.finding.kind.value,
                unit=transition.finding.unit,
                path=transition.finding.path,
            )
            self._alert(transition)
        if any(f.kind is FindingKind.STALE_LOAD for f in self._findings.values()):
            self._stale.set()
        # A file is healed once per version: a finding that stays open while its file is
        # replaced again (or a heal that lost a race) gets another attempt, a stuck one does not.
        self._heal_tried = {k: v for k, v in self._heal_tried.items() if k in self._findings}
        if any(self._heal_due(f) for f in self._findings.values()):
            self._heal()

    def _alert(self, transition: Transition) -> None:
        sent = self._gate.offer(transition, time.monotonic())
        if sent is not None:
            self.journal.send_transition(sent)
        else:
            self._alerts_due.set()

    async def send_held_alerts(self) -> None:
        """Flush transitions the per-finding rate limit held back, once their interval passes."""
        while True:
            await self._alerts_due.wait()
            self._alerts_due.clear()
            while (due := self._gate.next_due()) is not None:
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                for transition in self._gate.due(time.monotonic()):
                    self.journal.send_transition(transition)

    # ---- actions ---------------------------------------------------------------------------

    def _heal_due(self, finding: Finding) -> bool:
        obs = self.tracker.obs
        fact = obs.facts.get(finding.path) if obs else None
        return self._healer.wants(finding, self.settings.policy) and self._heal_tried.get(
            finding.key
        ) != _identity(fact)

    def _heal(self) -> bool:
        healed = False
        exp, obs = self.tracker.expectations(), self.tracker.obs
        for finding in list(self._findings.values()):
            if not self._heal_due(finding):
                continue
            expected = exp.home_manager_links.get(finding.path)
            fact = obs.facts.get(finding.path) if obs else None
            self._heal_tried[finding.key] = _identity(fact)
            outcome = self._healer.heal(finding, fact, expected, obs.unit_dirs if obs else ())
            self.telemetry.record_heal(finding.kind.value, "ok" if outcome.ok else "failed")
            self.journal.send_heal(outcome.ok, finding, outcome.detail)
            log.info(
                "heal.done" if outcome.ok else "heal.failed",
                path=finding.path,
                detail=outcome.detail,
            )
            healed |= outcome.ok
        if healed:
            # The placed links raise inotify events of their own; this makes sure a resync follows.
            self._changes.put_nowait(FullResync("healed", time.monotonic()))
        return healed

    async def reload_when_stale(self) -> None:
        """Reload the manager after a quiet window while stale-load findings are open, per policy."""
        while True:
            await self._stale.wait()
            self._stale.clear()
            policy = self.settings.policy
            if policy.need_daemon_reload != "reload":
                continue
            # The quiet window restarts with every change; sleep until it has really passed.
            while (quiet := self._last_change + policy.quiet_window - time.monotonic()) > 0:  # noqa: ASYNC110
                await asyncio.sleep(quiet)
            stale = [f for f in self._findings.values() if f.kind is FindingKind.STALE_LOAD]
            conn = self._conn
            if not stale or conn is None:
                continue
            trigger = (
                "need-daemon-reload"
                if any("NeedDaemonReload" in f.detail for f in stale)
                else "content-hash"
            )
            oversized = self.tracker.oversized_definitions()
            if oversized:
                # The manager would read every one of them; wait for the next change instead.
                self.telemetry.record_reload(trigger, "deferred")
                log.warning("reload.refused", trigger=trigger, oversized=oversized)
                continue
            try:
                allowed = await self._reload_gate.may_reload(conn, time.time())
                if allowed:
                    ok, detail = await reload_manager(conn, [f.unit for f in stale])
            except ManagerCallError as exc:
                allowed, ok, detail = True, False, str(exc)
            if not allowed:
                # A job or a matching unit is busy, or the hourly budget is spent: look again soon.
                self.telemetry.record_reload(trigger, "deferred")
                log.info("reload.deferred", trigger=trigger)
                await asyncio.sleep(max(policy.quiet_window, 0.5))
                self._stale.set()
                continue
            self._reload_gate.record(time.time())
            self.telemetry.record_reload(trigger, "ok" if ok else "failed")
            self.journal.send_reload(ok, trigger, detail)
            log.info("reload.done" if ok else "reload.failed", trigger=trigger, detail=detail)

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

    async def reload_config_on_signal(self, requested: asyncio.Event) -> None:
        """SIGHUP: re-read the configuration; a broken one is logged and the old one stays."""
        while True:
            await requested.wait()
            requested.clear()
            if self._load_settings is None:
                continue
            notify.reloading()
            try:
                settings = self._load_settings()
            except Exception as exc:
                log.error("config.reload_failed", error=str(exc))
            else:
                pending = [
                    name
                    for name in ("state_dir", "manager", "metrics", "log")
                    if getattr(settings, name) != getattr(self.settings, name)
                ]
                observer = self.tracker.observer
                if settings.provenance != self.settings.provenance and observer is not None:
                    observer.managed_roots = settings.provenance.managed_roots
                    observer.read_home_manager = settings.provenance.home_manager
                    # Expectations are rebuilt, the generation read again (or no longer).
                    self.tracker.forget_generation()
                self.settings = settings
                self._gate.interval = settings.policy.alert_min_interval
                self._reload_gate = ReloadGate(settings.policy, self._reload_gate.history)
                if pending:
                    log.warning("config.restart_needed", sections=pending)
                log.info("config.reloaded")
                self._changes.put_nowait(FullResync("config reloaded", time.monotonic()))
            notify.notify("READY=1", "STATUS=configuration reloaded")

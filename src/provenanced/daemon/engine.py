"""One user manager followed: changes in, one re-read, the state updated, alerts and actions out."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Coroutine, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import replace
from typing import Any

import structlog

from provenanced.config import Settings
from provenanced.core.state import AuditState
from provenanced.daemon.actions import Actions
from provenanced.daemon.activation import Activation
from provenanced.daemon.changes import (
    BaselineChanged,
    Change,
    FullResync,
    PathChanged,
    UnitChanged,
    change_for_watch_event,
    watched_places,
)
from provenanced.daemon.connection import ManagerLink
from provenanced.daemon.heal import Healer
from provenanced.daemon.jobs import JobVerifier
from provenanced.daemon.observer import Observer, baseline_facts, user_dirs
from provenanced.daemon.tasks import run_until
from provenanced.daemon.watches import Watches
from provenanced.errors import ManagerCallError
from provenanced.expect import baseline
from provenanced.expect.packages import open_database
from provenanced.fs.facts import FactReader
from provenanced.fs.watch import WatchEvent, WatchLimitReached
from provenanced.model import DaemonStatus, JobChecks, Transition
from provenanced.sinks.alerts import Alerts
from provenanced.sinks.journal import JournalSink
from provenanced.sinks.metrics import Telemetry
from provenanced.systemd import manager
from provenanced.systemd.bus import ManagerConnection

log = structlog.get_logger("provenanced.engine")

# Pause before retrying a re-check the manager failed, so an erroring manager is not hammered.
_RETRY_DELAY = 1.0
# How often a held activation is looked at again when no event comes.
_ACTIVATION_LOOK = 0.5


class Engine:
    """Follows one user manager: its connection, its watches, its state, its alerts and actions."""

    def __init__(
        self,
        settings: Settings,
        telemetry: Telemetry,
        journal: JournalSink,
        env: Mapping[str, str] = os.environ,
        *,
        executor: Executor | None = None,
        state_dir: str | None = None,
        uid: int | None = None,
    ) -> None:
        """``executor`` runs every file read, watch and heal (host mode: the user's thread;
        without one, reads go to the loop's default executor and heals run on the loop). Host
        mode also passes a ``state_dir`` of the daemon's (quarantine stays in the user's own
        state dir) and the user's ``uid``, the owner their unit files should have.
        """
        self.settings = settings
        self.telemetry = telemetry
        self.env = dict(env)
        self.dirs = user_dirs(env)
        self.state_dir = state_dir or settings.resolved_state_dir(env)
        self.state = AuditState(settings.provenance.managed_roots)
        self.alerts = Alerts(journal, telemetry, settings.policy.alert_min_interval)
        healer = Healer(settings.resolved_state_dir(env), self.dirs.home)
        self._executor = executor
        self._uid = os.getuid() if uid is None else uid
        self.actions = Actions(settings.policy, healer, telemetry, journal, executor)
        self.jobs = JobVerifier(self.state, telemetry, journal)
        self.link = ManagerLink(
            lambda: self.settings.manager,
            self.env,
            telemetry,
            journal,
            self.jobs,
            self._observer_for,
        )
        self.connected = self.link.connected
        # Set with the first status published after a full audit: /-/ready, READY=1 and
        # whoever waits on it then see that audit, never the empty status before it.
        self.ready = asyncio.Event()
        self.status = DaemonStatus()
        self.resyncs = 0
        self._changes: asyncio.Queue[Change] = asyncio.Queue()
        self._reader = FactReader()  # its hash cache outlives connections
        self._behind = False  # a re-read failed; the findings wait for its retry
        # One re-read at a time: a partial one started from the observation a concurrent full
        # resync (a reconnect) replaces would land after it and undo it.
        self._reading = asyncio.Lock()
        self._baseline = baseline.BaselineFile(self.state_dir)
        # Outlives connections, like the hash cache: it re-reads only the info files that changed.
        self.activation = Activation(self.dirs.home, settings.policy.activation_timeout)
        self._packages = open_database(
            settings.provenance.packages, settings.provenance.package_root
        )
        self._places = watched_places(self.state_dir, self.dirs, self._uid, self._packages)
        self.watches = Watches(self._places.extra_dirs, self._on_watch_event, telemetry, executor)
        self._tg: asyncio.TaskGroup | None = None
        self._looks_due: set[str] = set()  # reasons a later look is already scheduled for

    async def run(self, stop: asyncio.Event) -> None:
        """Run every loop until ``stop`` is set; a crashed loop ends the engine."""
        try:
            await run_until(stop, self._start_loops)
        finally:
            self.watches.close()
            await self.link.close()

    def _start_loops(self, tg: asyncio.TaskGroup) -> None:
        self._tg = tg
        following = self.link.follow(
            self._resync_on_connect, self._changes.put_nowait, self._verify_job, self.publish
        )
        tg.create_task(following, name="manager.follow")
        tg.create_task(self.reconcile_changes(), name="engine.reconcile")
        tg.create_task(self.alerts.send_held(), name="alerts.flush")
        reloads = self.actions.reload_when_stale(self.state, lambda: self.link.conn)
        tg.create_task(reloads, name="actions.reload")
        backstop = self.watches.backstop(lambda: self.settings.policy, self._backstop)
        tg.create_task(backstop, name="engine.backstop")

    def follow_settings(self, settings: Settings) -> None:
        """Take a reloaded configuration's policy and provenance sections, and look again."""
        if settings.provenance != self.settings.provenance:
            provenance = settings.provenance
            self.state.follow_roots(provenance.managed_roots)
            # Watched places stay as they were: a database added here is read at each resync.
            self._packages = open_database(provenance.packages, provenance.package_root)
            if self.link.observer is not None:
                self.link.observer.follow(provenance, self._packages)
        self.settings = settings
        self.alerts.gate.interval = settings.policy.alert_min_interval
        self.actions.follow_policy(settings.policy)
        self.activation.timeout = settings.policy.activation_timeout
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
        if self.resyncs:
            self.ready.set()
        connected = self.link.connected.is_set()
        flags = DaemonStatus(
            manager_connected=connected,
            transport=self.link.transport,
            ready=self.ready.is_set(),
            behind=self._behind or not connected,
            degraded=self.watches.degraded,
            inotify_watches=self.watches.count,
            last_full_resync=self.status.last_full_resync,
            activation_in_progress=self.activation.reason is not None,
            activation_stuck=self.activation.stuck,
        )
        # While an activation runs, what was published before it stays published.
        status = self.state.status(flags)
        self.status = replace(status, findings=self.activation.published(self.state.findings))

    def _observer_for(self, conn: ManagerConnection) -> Observer:
        observer = Observer(
            conn, self.dirs, (), reader=self._reader, executor=self._executor, uid=self._uid
        )
        observer.follow(self.settings.provenance, self._packages)
        return observer

    async def _resync_on_connect(self) -> None:
        await self._reread([FullResync("connected", time.monotonic(), True)])

    def _verify_job(
        self, conn: ManagerConnection, event: manager.JobRemoved, announced: JobChecks | None
    ) -> None:
        # Verification needs D-Bus reads; it runs as its own small task of the loop.
        self._spawn(self._after_job(self.jobs.verify(conn, event, announced)), "jobs.verify")

    async def _after_job(self, verified: Coroutine[Any, Any, list[Transition]]) -> None:
        await self._after(await verified)

    def _on_watch_event(self, event: WatchEvent) -> None:
        if isinstance(event, WatchLimitReached):
            self.publish()  # degraded now
        change = change_for_watch_event(event, self._places)
        if isinstance(change, PathChanged):
            self.actions.last_change = time.monotonic()
        if change is not None:
            self._changes.put_nowait(change)

    async def reconcile_changes(self) -> None:
        """Drain queued changes in one batch and re-read the least that covers them."""
        while True:
            batch = [await self._changes.get()]
            while not self._changes.empty():
                batch.append(self._changes.get_nowait())
            if self.link.observer is None or self.state.observation is None:
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
        observer = self.link.observer
        assert observer is not None, "re-read without a connection"
        started = time.monotonic()
        async with self._reading:
            reading = await observer.read(batch, self.state.observation)
            full = reading.touched is None
            if full:
                await self.watches.follow(reading.observation, self._spawn)
            if full or any(isinstance(c, BaselineChanged) for c in batch):
                obs = reading.observation
                accepted = self._baseline.read_if_changed(lambda: baseline_facts(obs))
                if accepted is not None:
                    self.state.accept_baseline(accepted)
            transitions = self.state.update(reading, time.time())
            self.activation.follow(self.state, reading.manager_reloaded)
        if full:
            self._resynced(batch, time.monotonic() - started)
        await self._after(transitions)

    async def _after(self, transitions: list[Transition]) -> None:
        # Off the loop: the roots resolve into the store, which may be a mount that hangs.
        loop = asyncio.get_running_loop()
        roots = await loop.run_in_executor(self._executor, self.activation.read_roots)
        verdict = self.activation.look(
            self.state, self.status.findings, transitions, time.monotonic(), roots
        )
        self.actions.held = verdict.holding
        if verdict.holding:
            # Nothing need announce an activation's end (a unit going inactive) or a stuck one.
            self._look_again(_ACTIVATION_LOOK, "activation.look")
            self.publish()
            return
        self.alerts.send(verdict.transitions)
        outcomes = await self.actions.consider(self.state)
        if any(outcome.ok for outcome in outcomes):
            # The placed links raise inotify events of their own; this makes sure a resync follows.
            self._changes.put_nowait(FullResync("healed", time.monotonic()))
        waits = [o.retry_in for o in outcomes if o.retry_in is not None]
        if waits:
            # A heal waits for its file to be quiet, and no event need come then.
            self._look_again(min(waits), "actions.heal_retry")
        self.publish()

    def _look_again(self, delay: float, why: str) -> None:
        """Look at the state again after ``delay``, once per reason however often asked."""
        if why not in self._looks_due:
            self._looks_due.add(why)
            self._spawn(self._look_later(delay, why), why)

    async def _look_later(self, delay: float, why: str) -> None:
        await asyncio.sleep(delay)
        self._looks_due.discard(why)
        unit = self.activation.unit_signal()  # the hold rests on a unit's state: re-read it
        if unit is not None:
            self._changes.put_nowait(UnitChanged(unit, time.monotonic()))
        else:
            await self._after([])

    def _resynced(self, batch: Sequence[Change], duration: float) -> None:
        self.resyncs += 1
        self._behind = False
        self.telemetry.observe_resync(duration)
        self.status = replace(self.status, last_full_resync=time.time())
        reasons = {c.reason for c in batch if isinstance(c, FullResync)} or {"unit directory"}
        log.debug("engine.resynced", reason=", ".join(sorted(reasons)), seconds=round(duration, 4))

    def _backstop(self) -> None:
        self._changes.put_nowait(FullResync("backstop", time.monotonic()))

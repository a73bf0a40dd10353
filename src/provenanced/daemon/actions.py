"""What the daemon does about drift: reload the manager when allowed, heal links when opted in."""

from __future__ import annotations

import asyncio
import fnmatch
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Executor
from functools import partial

import structlog

from provenanced.config import PolicySettings
from provenanced.core.index import PathIndex
from provenanced.core.state import AuditState
from provenanced.core.transitions import Key
from provenanced.daemon.heal import Healer, HealOutcome
from provenanced.errors import ManagerCallError
from provenanced.model import FileFact, Finding, FindingKind, Observation
from provenanced.sinks.journal import JournalSink
from provenanced.sinks.metrics import Telemetry
from provenanced.systemd import manager
from provenanced.systemd.bus import ManagerConnection
from provenanced.systemd.names import could_define_unit

log = structlog.get_logger("provenanced.actions")

_HOUR = 3600.0

_FileIdentity = tuple[object, ...] | None


def _identity(fact: FileFact | None) -> _FileIdentity:
    """What tells one version of a file from the next (what a heal re-checks before acting)."""
    if fact is None:
        return None
    return (fact.kind, fact.inode, fact.mtime_ns, fact.sha256, fact.target)


def oversized_definitions(obs: Observation | None) -> list[str]:
    """Files over the cap that a daemon-reload would have the manager read for a loaded unit."""
    if obs is None:
        return []
    oversized = [p for p, f in obs.facts.items() if f.oversized and could_define_unit(p)]
    if not oversized:
        return []
    dirs = {d.path: d for d in obs.unit_dirs}
    index = PathIndex.build(obs.units.values())
    return sorted(p for p in oversized if any(n in obs.units for n in index.affected(p, dirs)))


class ReloadGate:
    """Decides whether an automatic reload may happen now: budget per hour, nothing busy."""

    def __init__(self, policy: PolicySettings, history: Iterable[float] = ()) -> None:
        self.policy = policy
        self.history: deque[float] = deque(history)

    def within_budget(self, now: float) -> bool:
        """Fewer than ``max_reloads_per_hour`` reloads in the last hour."""
        while self.history and now - self.history[0] >= _HOUR:
            self.history.popleft()
        return len(self.history) < self.policy.max_reloads_per_hour

    async def may_reload(self, conn: ManagerConnection, now: float) -> bool:
        """Within budget, no job queued, and no unit matching ``defer_while_active`` activating."""
        if not self.within_budget(now):
            return False
        if await manager.list_jobs(conn):
            return False
        patterns = self.policy.defer_while_active
        if patterns:
            for unit in await manager.list_units(conn):
                if unit.active_state == "activating" and any(
                    fnmatch.fnmatchcase(unit.name, p) for p in patterns
                ):
                    return False
        return True

    def record(self, now: float) -> None:
        """Count one reload against the budget."""
        self.history.append(now)


async def reload_manager(conn: ManagerConnection, units: Iterable[str]) -> tuple[bool, str]:
    """Reload the manager, then check that NeedDaemonReload cleared for the units that needed it."""
    names = sorted(set(units))
    await manager.reload(conn)
    records = await manager.get_unit_records(conn, names)
    still = sorted(name for name, record in records.items() if record.need_daemon_reload)
    if still:
        return False, f"NeedDaemonReload is still yes after the reload for: {', '.join(still)}"
    return True, f"reloaded; {len(names)} stale unit(s) now current: {', '.join(names)}"


class Actions:
    """Decides and carries out the daemon's actions on one manager's open findings.

    ``consider`` runs after every update: it wakes the reloader while stale loads are open and
    heals, at most once per version of a file, what policy opts in. The engine requeues a
    re-read after a heal that placed links, and calls ``consider`` again after a deferred one.
    """

    def __init__(
        self,
        policy: PolicySettings,
        healer: Healer,
        telemetry: Telemetry,
        journal: JournalSink,
        executor: Executor | None = None,
    ) -> None:
        self.policy = policy
        # Host mode heals on the thread holding the user's credentials; user mode on the loop.
        self._executor = executor
        self._healing = asyncio.Lock()  # one consider at a time heals: no file is healed twice
        self.gate = ReloadGate(policy)
        self.last_change = time.monotonic()  # the reload's quiet window restarts at each change
        self._healer = healer
        self._telemetry = telemetry
        self._journal = journal
        self._heal_tried: dict[Key, _FileIdentity] = {}
        self._reload_wanted = asyncio.Event()
        self._free = asyncio.Event()  # clear while a Home Manager activation holds every action
        self._free.set()

    @property
    def held(self) -> bool:
        """Whether an activation is running: no reload, no heal until it ends."""
        return not self._free.is_set()

    @held.setter
    def held(self, value: bool) -> None:
        if value:
            self._free.clear()
        else:
            self._free.set()

    def follow_policy(self, policy: PolicySettings) -> None:
        """Act by a new policy from now on; the reload budget already spent stays spent."""
        self.policy, self.gate = policy, ReloadGate(policy, self.gate.history)

    async def consider(self, state: AuditState) -> list[HealOutcome]:
        """Wake the reloader for stale loads; heal what is due; return what each heal did."""
        if self.held:
            return []  # the activation relinks and reloads itself: never fight it
        if state.has_open(FindingKind.STALE_LOAD):
            self._reload_wanted.set()
        # A file is healed once per version: a finding that stays open while its file is
        # replaced again (or a heal that lost a race) gets another attempt, a stuck one does not.
        self._heal_tried = {k: v for k, v in self._heal_tried.items() if k in state.findings}
        async with self._healing:
            due = [f for f in list(state.findings.values()) if self._heal_due(f, state)]
            return [await self._heal(f, state) for f in due]

    def _heal_due(self, finding: Finding, state: AuditState) -> bool:
        obs = state.observation
        fact = obs.facts.get(finding.path) if obs else None
        return self._healer.wants(finding, self.policy) and self._heal_tried.get(
            finding.key
        ) != _identity(fact)

    async def _heal(self, finding: Finding, state: AuditState) -> HealOutcome:
        obs = state.observation
        expected = state.expectations.home_manager_links.get(finding.path)
        fact = obs.facts.get(finding.path) if obs else None
        self._heal_tried[finding.key] = _identity(fact)
        heal = partial(
            self._healer.heal,
            finding,
            fact,
            expected,
            obs.unit_dirs if obs else (),
            self.policy.quiet_window,
        )
        if self._executor is None:
            outcome = heal()
        else:
            outcome = await asyncio.get_running_loop().run_in_executor(self._executor, heal)
        if outcome.retry_in is not None:
            # Still being written, or changed within the quiet window: this version is not
            # tried yet, and the engine asks again after ``retry_in``.
            del self._heal_tried[finding.key]
            log.debug("heal.deferred", path=finding.path, detail=outcome.detail)
            return outcome
        self._telemetry.record_heal(finding.kind.value, "ok" if outcome.ok else "failed")
        self._journal.send_heal(outcome.ok, finding, outcome.detail)
        log.info(
            "heal.done" if outcome.ok else "heal.failed", path=finding.path, detail=outcome.detail
        )
        return outcome

    async def reload_when_stale(
        self, state: AuditState, connection: Callable[[], ManagerConnection | None]
    ) -> None:
        """Reload the manager after a quiet window while stale-load findings are open, per policy."""
        while True:
            await self._reload_wanted.wait()
            self._reload_wanted.clear()
            policy = self.policy
            if policy.need_daemon_reload != "reload":
                continue
            # The quiet window restarts with every change; sleep until it has really passed.
            while (quiet := self.last_change + policy.quiet_window - time.monotonic()) > 0:  # noqa: ASYNC110
                await asyncio.sleep(quiet)
            if self.held:
                # The activation runs its own daemon-reload; what is still stale after it wakes us.
                continue
            stale = [f for f in state.findings.values() if f.kind is FindingKind.STALE_LOAD]
            conn = connection()
            if not stale or conn is None:
                continue
            trigger = (
                "need-daemon-reload"
                if any("NeedDaemonReload" in f.detail for f in stale)
                else "content-hash"
            )
            oversized = oversized_definitions(state.observation)
            if oversized:
                # The manager would read every one of them; wait for the next change instead.
                self._telemetry.record_reload(trigger, "deferred")
                log.warning("reload.refused", trigger=trigger, oversized=oversized)
                continue
            try:
                allowed = await self.gate.may_reload(conn, time.time())
                if allowed:
                    ok, detail = await reload_manager(conn, [f.unit for f in stale])
            except ManagerCallError as exc:
                allowed, ok, detail = True, False, str(exc)
            if not allowed:
                # A job or a matching unit is busy, or the hourly budget is spent: look again soon.
                self._telemetry.record_reload(trigger, "deferred")
                log.info("reload.deferred", trigger=trigger)
                await asyncio.sleep(max(policy.quiet_window, 0.5))
                self._reload_wanted.set()
                continue
            self.gate.record(time.time())
            self._telemetry.record_reload(trigger, "ok" if ok else "failed")
            self._journal.send_reload(ok, trigger, detail)
            log.info("reload.done" if ok else "reload.failed", trigger=trigger, detail=detail)

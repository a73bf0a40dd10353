"""Did a job really do what it said? Judge a unit after its job ended, and ``restart --verify``."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from provenanced.model import Finding, FindingKind
from provenanced.systemd import manager
from provenanced.systemd.bus import ManagerConnection

_CLD_EXITED = 1
_SETTLING = frozenset({"activating", "deactivating", "reloading", "refreshing"})
_TIMEOUT = "timeout"


def judge(
    result: manager.ServiceResult, job_result: str, before_invocation: str | None = None
) -> str | None:
    """Why the unit did not verify after its job, or None when it did."""
    reason = _unit_reason(result)
    if job_result != "done":
        return f"the job ended '{job_result}'" + (f": {reason}" if reason else "")
    if (
        reason is None
        and before_invocation is not None
        and result.invocation_id == before_invocation
    ):
        return "the unit did not run (its InvocationID did not change)"
    return reason


def _unit_reason(result: manager.ServiceResult) -> str | None:
    if not result.condition_result:
        return "a start condition failed (ConditionResult=no): the unit did not run"
    if not result.assert_result:
        return "a start assertion failed (AssertResult=no)"
    if result.exec_main_code == _CLD_EXITED and result.exec_main_status != 0:
        return f"the main process exited with status {result.exec_main_status} (Result={result.result})"
    if result.result != "success":
        return f"the unit's Result is '{result.result}'"
    if result.active_state == "failed":
        return "the unit is in the failed state"
    return None


class JobTracker:
    """Open ``job-unverified`` findings: opened by a job that did not verify, closed by one that did."""

    def __init__(self) -> None:
        self._open: dict[str, Finding] = {}
        self.queued: set[str] = set()

    def started(self, event: manager.JobNew) -> None:
        """A job was queued."""
        self.queued.add(event.job_path)

    def finished(self, event: manager.JobRemoved) -> None:
        """A job left the queue."""
        self.queued.discard(event.job_path)

    def judge(self, event: manager.JobRemoved, result: manager.ServiceResult) -> Finding | None:
        """Open or close the unit's finding; return it when newly opened."""
        # A stop job (or a clean oneshot): nothing claimed to run and fail.
        if (
            result.active_state in ("inactive", "deactivating")
            and result.result == "success"
            and result.condition_result
            and result.assert_result
            and (result.exec_main_status == 0 or result.exec_main_code != _CLD_EXITED)
        ):
            self._open.pop(event.unit, None)
            return None
        reason = judge(result, event.result)
        if reason is None:
            self._open.pop(event.unit, None)
            return None
        finding = Finding(
            FindingKind.JOB_UNVERIFIED,
            event.unit,
            "",
            "critical",
            f"job {event.job_id} ended 'done' but {reason}",
        )
        opened = event.unit not in self._open
        self._open[event.unit] = finding
        return finding if opened else None

    def findings(self) -> list[Finding]:
        """Currently open job-unverified findings."""
        return list(self._open.values())


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome of ``restart --verify``."""

    verified: bool
    reason: str


async def restart_and_verify(conn: ManagerConnection, unit: str, timeout: float) -> Verdict:
    """Restart ``unit`` through D-Bus, wait for its job and for it to settle, then judge it."""
    removed: dict[str, asyncio.Future[str]] = {}
    loop = asyncio.get_running_loop()
    early: dict[str, str] = {}

    def on_signal(event: manager.ManagerEvent) -> None:
        if isinstance(event, manager.JobRemoved):
            future = removed.get(event.job_path)
            if future is not None and not future.done():
                future.set_result(event.result)
            else:
                early[event.job_path] = event.result

    await manager.subscribe(conn, on_signal)
    before = await manager.get_service_result(conn, unit)
    try:
        async with asyncio.timeout(timeout):
            job = await manager.restart_unit(conn, unit)
            future = removed.setdefault(job, loop.create_future())
            if job in early:
                future.set_result(early[job])
            job_result = await future
            result = await _settled(conn, unit)
    except TimeoutError:
        return Verdict(
            False, f"timed out after {timeout:g} s waiting for {unit} to restart and settle"
        )
    reason = judge(result, job_result, before.invocation_id or None)
    if reason is None:
        return Verdict(
            True, f"{unit} restarted and verified (Result={result.result}, {result.active_state})"
        )
    return Verdict(False, reason)


async def _settled(conn: ManagerConnection, unit: str) -> manager.ServiceResult:
    while True:
        result = await manager.get_service_result(conn, unit)
        if result.active_state not in _SETTLING:
            return result
        # The manager emits no "settled" signal for every unit type; re-read at a gentle pace.
        await asyncio.sleep(0.05)

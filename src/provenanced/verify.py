"""Did a job really do what it said? Judge a unit after its job ended, and ``restart --verify``."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from dataclasses import dataclass

import structlog

from provenanced.errors import ManagerCallError, ManagerUnreachableError
from provenanced.model import Finding, FindingKind
from provenanced.systemd import manager
from provenanced.systemd.bus import ManagerConnection, resolve_address
from provenanced.systemd.names import unit_object_path

UNIT_IFACE = "org.freedesktop.systemd1.Unit"
log = structlog.get_logger("provenanced.verify")

_CLD_EXITED = 1
_SETTLING = frozenset({"activating", "deactivating", "reloading", "refreshing"})
_TIMEOUT = "timeout"
_SYSTEMD_ERRORS = "org.freedesktop.systemd1."


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
        if not result.invocation_id:
            # The manager already unloaded the unit (GC after its job): its results are gone,
            # and reading it reloaded a blank copy. Unknown is not "failed".
            return None
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


async def restart_and_verify(
    conn: ManagerConnection, unit: str, timeout: float, env: Mapping[str, str] | None = None
) -> Verdict:
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
    pinned = await _pin(conn, unit, env or {})
    try:
        async with asyncio.timeout(timeout):
            try:
                job = await manager.restart_unit(conn, unit)
            except ManagerCallError as exc:
                # The manager answered, and refused (no such unit, masked, failed to load): the
                # unit did not verify. A lost connection or a timeout stays "unreachable".
                if not exc.error_name.startswith(_SYSTEMD_ERRORS):
                    raise
                return Verdict(False, f"the manager refused to restart {unit}: {exc.reply}")
            future = removed.setdefault(job, loop.create_future())
            if job in early:
                future.set_result(early[job])
            job_result = await future
            result = await _settled(conn, unit)
    except TimeoutError:
        return Verdict(
            False, f"timed out after {timeout:g} s waiting for {unit} to restart and settle"
        )
    finally:
        if pinned is not None:
            await _unpin(pinned, unit)
    reason = judge(result, job_result, before.invocation_id or None)
    if reason is None:
        return Verdict(
            True, f"{unit} restarted and verified (Result={result.result}, {result.active_state})"
        )
    return Verdict(False, reason)


async def _pin(
    conn: ManagerConnection, unit: str, env: Mapping[str, str]
) -> ManagerConnection | None:
    """Hold a reference on the unit; an unreferenced oneshot is unloaded, results and all, after its job.

    ``Unit.Ref`` tracks the caller's bus name, which a private-socket peer does not have, so the
    reference is taken over the user bus when there is one.
    """
    candidates = [conn]
    if conn.transport.kind == "private":
        with contextlib.suppress(ManagerUnreachableError):
            bus = resolve_address(
                None, {k: v for k, v in env.items() if k != "XDG_RUNTIME_DIR"} | _bus_env(env)
            )
            candidates.append(await ManagerConnection.connect(bus, timeout=conn.timeout))
    for candidate in candidates:
        try:
            await candidate.call("Ref", interface=UNIT_IFACE, path=unit_object_path(unit))
        except ManagerCallError as exc:
            log.debug(
                "verify.pin_failed", unit=unit, transport=candidate.transport.kind, error=str(exc)
            )
            continue
        return candidate
    for candidate in candidates[1:]:
        await candidate.close()
    return None


def _bus_env(env: Mapping[str, str]) -> dict[str, str]:
    runtime = env.get("XDG_RUNTIME_DIR")
    if runtime and not env.get("DBUS_SESSION_BUS_ADDRESS"):
        return {"DBUS_SESSION_BUS_ADDRESS": f"unix:path={runtime}/bus"}
    return {}


async def _unpin(pinned: ManagerConnection, unit: str) -> None:
    with contextlib.suppress(ManagerCallError):
        await pinned.call("Unref", interface=UNIT_IFACE, path=unit_object_path(unit))
    if pinned.transport.kind != "private":
        await pinned.close()


async def _settled(conn: ManagerConnection, unit: str) -> manager.ServiceResult:
    while True:
        result = await manager.get_service_result(conn, unit)
        if result.active_state not in _SETTLING:
            return result
        # The manager emits no "settled" signal for every unit type; re-read at a gentle pace.
        await asyncio.sleep(0.05)

"""``provenanced restart --verify``: restart a unit, wait for it to settle, and judge the outcome."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from dataclasses import dataclass

import structlog

from provenanced.core.jobs import read_back, unverified_reason
from provenanced.errors import ManagerCallError, ManagerUnreachableError
from provenanced.model import JobChecks, ServiceResult
from provenanced.systemd import manager
from provenanced.systemd.bus import ManagerConnection, resolve_address
from provenanced.systemd.checks import ChecksSeen
from provenanced.systemd.names import unit_object_path

UNIT_IFACE = "org.freedesktop.systemd1.Unit"
log = structlog.get_logger("provenanced.verify")

_SETTLING = frozenset({"activating", "deactivating", "reloading", "refreshing"})
_SYSTEMD_ERRORS = "org.freedesktop.systemd1."


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
    seen = ChecksSeen()
    announced: dict[str, JobChecks | None] = {}

    def on_signal(event: manager.ManagerEvent) -> None:
        checks = seen.observe(event)
        if isinstance(event, manager.JobRemoved):
            announced[event.job_path] = checks
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
    # ``before`` was read before the job was queued; the signals cover a unit unloaded after it.
    around = announced.get(job)
    checks = JobChecks(before.checks, around.after if around else before.checks)
    checks = read_back(checks, result.checks)
    reason = unverified_reason(result, job_result, before.invocation_id or None, checks)
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


async def _settled(conn: ManagerConnection, unit: str) -> ServiceResult:
    while True:
        result = await manager.get_service_result(conn, unit)
        if result.active_state not in _SETTLING:
            return result
        # The manager emits no "settled" signal for every unit type; re-read at a gentle pace.
        await asyncio.sleep(0.05)

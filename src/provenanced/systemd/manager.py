"""Typed org.freedesktop.systemd1 calls over a ManagerConnection: plain messages, no proxies."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import structlog
from dbus_fast import Message

from provenanced.errors import ManagerCallError
from provenanced.model import ServiceResult, StartChecks, UnitRecord
from provenanced.systemd.bus import MANAGER_IFACE, PROPERTIES_IFACE, ManagerConnection
from provenanced.systemd.events import (
    JobNew,
    JobRemoved,
    ManagerEvent,
    ManagerOwnerChanged,
    PropertiesChanged,
    Reloading,
    UnitFilesChanged,
    UnitNew,
    UnitRemoved,
    decode_signal,
    plain,
)
from provenanced.systemd.names import is_valid_unit_name, unit_object_path, unit_suffix

__all__ = [
    "JobNew",
    "JobRemoved",
    "JobSummary",
    "ManagerEvent",
    "ManagerOwnerChanged",
    "PropertiesChanged",
    "Reloading",
    "ServiceResult",
    "UnitFilesChanged",
    "UnitNew",
    "UnitRemoved",
    "UnitSummary",
    "decode_signal",
    "get_service_result",
    "get_unit_records",
    "job_of",
    "list_jobs",
    "list_units",
    "load_unit",
    "reload",
    "restart_unit",
    "start_checks",
    "subscribe",
    "unit_path",
]

UNIT_IFACE = "org.freedesktop.systemd1.Unit"
SERVICE_IFACE = "org.freedesktop.systemd1.Service"
# Unit types with a Result property, on their own interface; target, slice, device have none.
_RESULT_IFACES = {
    kind: f"org.freedesktop.systemd1.{kind.capitalize()}"
    for kind in ("socket", "mount", "swap", "timer", "path", "automount", "scope")
}
# A unit that vanished between listing and reading is skipped, not an error.
_GONE = frozenset(
    {"org.freedesktop.systemd1.NoSuchUnit", "org.freedesktop.DBus.Error.UnknownObject"}
)
_INVALID = "org.freedesktop.DBus.Error.InvalidArgs"
RELOAD_TIMEOUT = 90.0
log = structlog.get_logger("provenanced.manager")


@dataclass(frozen=True, slots=True)
class UnitSummary:
    """One row of ListUnits."""

    name: str
    description: str
    load_state: str
    active_state: str
    sub_state: str
    following: str
    path: str
    job_id: int
    job_type: str
    job_path: str


@dataclass(frozen=True, slots=True)
class JobSummary:
    """One row of ListJobs."""

    job_id: int
    unit: str
    job_type: str
    state: str
    job_path: str
    unit_path: str


async def list_units(conn: ManagerConnection) -> list[UnitSummary]:
    """Every unit the manager has in memory (aliases not repeated)."""
    (rows,) = await conn.call("ListUnits")
    # STRUCTs arrive as tuples or lists depending on dbus-fast's path; both unpack the same.
    return [UnitSummary(*row) for row in rows]


async def list_jobs(conn: ManagerConnection) -> list[JobSummary]:
    """The jobs queued or running right now."""
    (rows,) = await conn.call("ListJobs")
    return [JobSummary(*row) for row in rows]


async def unit_path(conn: ManagerConnection) -> tuple[str, ...]:
    """The manager's unit search path, highest priority first."""
    (value,) = await conn.call("Get", "ss", [MANAGER_IFACE, "UnitPath"], interface=PROPERTIES_IFACE)
    return tuple(plain(value))


async def load_unit(conn: ManagerConnection, name: str) -> str | None:
    """Load ``name`` from disk if the manager has not yet; its object path, None if refused."""
    if not is_valid_unit_name(name):
        return None
    try:
        (path,) = await conn.call("LoadUnit", "s", [name])
    except ManagerCallError as exc:
        if exc.error_name == _INVALID:
            return None
        raise
    return str(path)


async def reload(conn: ManagerConnection, timeout: float = RELOAD_TIMEOUT) -> None:
    """daemon-reload; the manager replies only once the reload is complete, hence the long wait."""
    await conn.call("Reload", timeout=timeout)


async def restart_unit(conn: ManagerConnection, name: str, mode: str = "replace") -> str:
    """Queue a restart job for ``name``; returns the job's object path."""
    (job,) = await conn.call("RestartUnit", "ss", [name, mode])
    return str(job)


async def _get_all_wrapped(
    conn: ManagerConnection, path: str, interface: str
) -> dict[str, Any] | None:
    """All properties of one interface, each still in its Variant; None when none can be read.

    A unit whose drop-in path is not UTF-8 cannot be sent over D-Bus at all: the manager answers
    InvalidArgs for the whole GetAll. Such a unit is judged from its files alone, and the re-read
    goes on (failing it would retry a full resync every second, forever).
    """
    try:
        (props,) = await conn.call(
            "GetAll", "s", [interface], interface=PROPERTIES_IFACE, path=path
        )
    except ManagerCallError as exc:
        if exc.error_name in _GONE:
            return None
        if exc.error_name == _INVALID:
            log.warning("manager.unit_unreadable", path=path, error=str(exc))
            return None
        raise
    return cast(dict[str, Any], props)


async def _get_all(conn: ManagerConnection, path: str, interface: str) -> dict[str, Any] | None:
    """All properties of one interface as plain values; None when the object is gone."""
    props = await _get_all_wrapped(conn, path, interface)
    return None if props is None else {key: plain(value) for key, value in props.items()}


def _invocation_id(value: Any) -> str:
    """InvocationID is an ``ay`` of 16 bytes, or empty before the first run."""
    return bytes(value or b"").hex()


def start_checks(props: Mapping[str, Any]) -> StartChecks | None:
    """The start checks in a unit's Unit-interface properties; None when they are not all there."""
    try:
        return StartChecks(
            condition_result=bool(props["ConditionResult"]),
            condition_timestamp=int(props["ConditionTimestampMonotonic"]),
            assert_result=bool(props["AssertResult"]),
            assert_timestamp=int(props["AssertTimestampMonotonic"]),
        )
    except (KeyError, TypeError, ValueError):
        return None


def job_of(props: Mapping[str, Any]) -> str | None:
    """The object path of the job in a unit's ``Job`` property, None when it has none."""
    match props.get("Job"):
        case (int(job_id), str(path)) | [int(job_id), str(path)] if job_id != 0:
            return path
    return None


def _unit_record(name: str, wrapped: Mapping[str, Any]) -> UnitRecord:
    """The provenance facts of one unit from its Unit-interface properties (still in Variants)."""

    # Only these ten of the hundred-odd properties are unwrapped: unwrapping them all was most
    # of our CPU in a full resync.
    def prop(key: str) -> Any:
        return plain(wrapped[key])

    return UnitRecord(
        name=name,
        load_state=prop("LoadState"),
        active_state=prop("ActiveState"),
        sub_state=prop("SubState"),
        fragment_path=prop("FragmentPath"),
        dropin_paths=tuple(prop("DropInPaths")),
        source_path=prop("SourcePath"),
        need_daemon_reload=prop("NeedDaemonReload"),
        unit_file_state=prop("UnitFileState"),
        invocation_id=_invocation_id(prop("InvocationID")),
    )


async def _read_record(conn: ManagerConnection, name: str) -> UnitRecord | None:
    """One unit's record, or None when it vanished mid-call."""
    props = await _get_all_wrapped(conn, unit_object_path(name), UNIT_IFACE)
    return None if props is None else _unit_record(name, props)


def _first_call_error(group: BaseExceptionGroup[BaseException]) -> ManagerCallError | None:
    """The first ManagerCallError in a (nested) exception group, so callers see a plain error."""
    for exc in group.exceptions:
        if isinstance(exc, ManagerCallError):
            return exc
        if isinstance(exc, BaseExceptionGroup):
            found = _first_call_error(exc)
            if found is not None:
                return found
    return None


async def get_unit_records(conn: ManagerConnection, names: Iterable[str]) -> dict[str, UnitRecord]:
    """Provenance properties of each named unit, read concurrently; vanished units are skipped.

    Reading a unit's object path makes the manager load it, so a unit that is not loaded yet comes
    back with ``LoadState=not-found`` or its real state. Invalid names are skipped without a call.
    """
    wanted = iter([name for name in dict.fromkeys(names) if is_valid_unit_name(name)])
    records: dict[str, UnitRecord] = {}

    async def read_some() -> None:
        # The workers share one iterator: each name is read once, by whichever worker is free.
        for name in wanted:
            record = await _read_record(conn, name)
            if record is not None:
                records[record.name] = record

    try:
        # As many workers as calls may be in flight, not a task per unit (1,000s of frames at
        # once). A TaskGroup cancels the rest on the first failure, instead of letting queued
        # calls each wait out their timeout on a manager that stopped answering.
        async with asyncio.TaskGroup() as group:
            for _ in range(conn.max_in_flight):
                group.create_task(read_some())
    except BaseExceptionGroup as failed:
        first = _first_call_error(failed)
        if first is None:
            raise
        raise first from failed
    return records


async def get_service_result(conn: ManagerConnection, name: str) -> ServiceResult:
    """Invocation, Result, main exit and condition/assert outcome of one unit."""
    path = unit_object_path(name)
    unit = await _get_all(conn, path, UNIT_IFACE)
    if unit is None:
        raise ManagerCallError(f"unit {name} vanished while reading its result")
    kind = unit_suffix(name)
    service: Mapping[str, Any] = {}
    # Units with nothing to fail (target, slice, device) have no Result: count them as success.
    result = "success"
    if kind == "service":
        service = await _get_all(conn, path, SERVICE_IFACE) or {}
        result = service.get("Result", result)
    elif kind in _RESULT_IFACES:
        (value,) = await conn.call(
            "Get", "ss", [_RESULT_IFACES[kind], "Result"], interface=PROPERTIES_IFACE, path=path
        )
        result = plain(value)
    return ServiceResult(
        invocation_id=_invocation_id(unit["InvocationID"]),
        result=result,
        exec_main_code=service.get("ExecMainCode", 0),
        exec_main_status=service.get("ExecMainStatus", 0),
        condition_result=unit["ConditionResult"],
        assert_result=unit["AssertResult"],
        active_state=unit["ActiveState"],
        sub_state=unit["SubState"],
        condition_timestamp=unit["ConditionTimestampMonotonic"],
        assert_timestamp=unit["AssertTimestampMonotonic"],
    )


async def subscribe(
    conn: ManagerConnection, handler: Callable[[ManagerEvent], None]
) -> Callable[[], None]:
    """Deliver the manager's signals to ``handler`` as typed events; returns an unsubscribe."""

    def on_message(msg: Message) -> None:
        event = decode_signal(msg)
        if event is not None:
            handler(event)

    return await conn.subscribe(on_message)

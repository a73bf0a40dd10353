"""The manager's D-Bus signals as typed, immutable events."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dbus_fast import Message, MessageType, Variant

from provenanced.model import frozen_map

SYSTEMD_NAME = "org.freedesktop.systemd1"
MANAGER_PATH = "/org/freedesktop/systemd1"
MANAGER_IFACE = "org.freedesktop.systemd1.Manager"
PROPERTIES_IFACE = "org.freedesktop.DBus.Properties"
DBUS_NAME = "org.freedesktop.DBus"
DBUS_PATH = "/org/freedesktop/DBus"


@dataclass(frozen=True, slots=True)
class UnitNew:
    """The manager loaded a unit."""

    name: str
    path: str


@dataclass(frozen=True, slots=True)
class UnitRemoved:
    """The manager unloaded a unit (garbage collection, or before a reload)."""

    name: str
    path: str


@dataclass(frozen=True, slots=True)
class JobNew:
    """A job was queued."""

    job_id: int
    job_path: str
    unit: str


@dataclass(frozen=True, slots=True)
class JobRemoved:
    """A job ended: ``result`` is done, canceled, timeout, failed, dependency or skipped."""

    job_id: int
    job_path: str
    unit: str
    result: str


@dataclass(frozen=True, slots=True)
class Reloading:
    """A daemon-reload began (``active``) or finished."""

    active: bool


@dataclass(frozen=True, slots=True)
class UnitFilesChanged:
    """Unit files were enabled, disabled, linked or masked through the manager."""


@dataclass(frozen=True, slots=True)
class PropertiesChanged:
    """Properties of one object (unit, job or the manager) changed; values are plain Python."""

    unit_path: str
    interface: str
    changed: Mapping[str, Any]
    invalidated: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ManagerOwnerChanged:
    """``org.freedesktop.systemd1`` changed hands on the bus ("" when the manager went away)."""

    new_owner: str


ManagerEvent = (
    UnitNew
    | UnitRemoved
    | JobNew
    | JobRemoved
    | Reloading
    | UnitFilesChanged
    | PropertiesChanged
    | ManagerOwnerChanged
)


def plain(value: Any) -> Any:
    """Unwrap dbus-fast Variants, also inside containers, so callers see plain Python values."""
    if isinstance(value, Variant):
        return plain(value.value)
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [plain(item) for item in value]
    if isinstance(value, tuple):
        return tuple(plain(item) for item in value)
    return value


def _in_manager_namespace(path: str) -> bool:
    """Whether ``path`` is the manager's object or one below it (a unit, a job)."""
    return path == MANAGER_PATH or path.startswith(MANAGER_PATH + "/")


def _manager_event(member: str | None, signature: str, body: list[Any]) -> ManagerEvent | None:
    """Decode one org.freedesktop.systemd1.Manager signal whose signature is as documented."""
    match member, signature:
        case "UnitNew", "so":
            return UnitNew(body[0], body[1])
        case "UnitRemoved", "so":
            return UnitRemoved(body[0], body[1])
        case "JobNew", "uos":
            return JobNew(body[0], body[1], body[2])
        case "JobRemoved", "uoss":
            return JobRemoved(body[0], body[1], body[2], body[3])
        case "Reloading", "b":
            return Reloading(body[0])
        case "UnitFilesChanged", "":
            return UnitFilesChanged()
    return None


def decode_signal(msg: Message) -> ManagerEvent | None:
    """Turn a raw signal into a typed event; None for anything this daemon does not use."""
    if msg.message_type is not MessageType.SIGNAL:
        return None
    # Signature checks keep a malformed or foreign signal from raising inside the bus reader.
    if msg.interface == MANAGER_IFACE and msg.path == MANAGER_PATH:
        return _manager_event(msg.member, msg.signature, msg.body)
    path = msg.path or ""
    if (
        msg.interface == PROPERTIES_IFACE
        and msg.member == "PropertiesChanged"
        and msg.signature == "sa{sv}as"
        and _in_manager_namespace(path)
    ):
        interface, changed, invalidated = msg.body
        return PropertiesChanged(path, interface, frozen_map(plain(changed)), tuple(invalidated))
    if (
        msg.interface == DBUS_NAME
        and msg.member == "NameOwnerChanged"
        and msg.signature == "sss"
        and msg.sender == DBUS_NAME
        and msg.path == DBUS_PATH
        and msg.body[0] == SYSTEMD_NAME
    ):
        return ManagerOwnerChanged(msg.body[2])
    return None

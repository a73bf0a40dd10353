"""Raw manager signals become typed events; everything else is ignored."""

from __future__ import annotations

from typing import Any

import pytest
from dbus_fast import Message, MessageType, Variant

from provenanced.systemd.events import (
    JobNew,
    JobRemoved,
    ManagerOwnerChanged,
    PropertiesChanged,
    Reloading,
    UnitFilesChanged,
    UnitNew,
    UnitRemoved,
    decode_signal,
    plain,
)

MANAGER = "/org/freedesktop/systemd1"
UNIT = "/org/freedesktop/systemd1/unit/backup_2eservice"
JOB = "/org/freedesktop/systemd1/job/16"


def _signal(
    member: str,
    signature: str,
    body: list[Any],
    *,
    path: str = MANAGER,
    interface: str = "org.freedesktop.systemd1.Manager",
    sender: str | None = None,
) -> Message:
    """A signal as dbus-fast hands it to a message handler."""
    return Message(
        message_type=MessageType.SIGNAL,
        path=path,
        interface=interface,
        member=member,
        signature=signature,
        body=body,
        sender=sender,
    )


class TestDecodeSignal:
    """Each signal the daemon uses maps to one event type."""

    @pytest.mark.parametrize(
        ("msg", "event"),
        [
            (
                _signal("UnitNew", "so", ["backup.service", UNIT]),
                UnitNew("backup.service", UNIT),
            ),
            (
                _signal("UnitRemoved", "so", ["backup.service", UNIT]),
                UnitRemoved("backup.service", UNIT),
            ),
            (
                _signal("JobNew", "uos", [16, JOB, "backup.service"]),
                JobNew(16, JOB, "backup.service"),
            ),
            (
                _signal("JobRemoved", "uoss", [16, JOB, "backup.service", "done"]),
                JobRemoved(16, JOB, "backup.service", "done"),
            ),
            (_signal("Reloading", "b", [True]), Reloading(active=True)),
            (_signal("Reloading", "b", [False]), Reloading(active=False)),
            (_signal("UnitFilesChanged", "", []), UnitFilesChanged()),
            (
                _signal(
                    "NameOwnerChanged",
                    "sss",
                    ["org.freedesktop.systemd1", ":1.1", ":1.9"],
                    path="/org/freedesktop/DBus",
                    interface="org.freedesktop.DBus",
                    sender="org.freedesktop.DBus",
                ),
                ManagerOwnerChanged(":1.9"),
            ),
        ],
    )
    def test_manager_signals(self, msg: Message, event: object) -> None:
        """Manager and bus-driver signals decode to their event."""
        assert decode_signal(msg) == event

    def test_properties_changed_is_plain(self) -> None:
        """Variants are unwrapped, also nested ones, and the mapping is read-only."""
        changed = {
            "ActiveState": Variant("s", "active"),
            "InvocationID": Variant("ay", b"\x01\x02"),
            "Job": Variant("(uo)", [16, JOB]),
            "Nested": Variant("v", Variant("s", "x")),
        }
        msg = _signal(
            "PropertiesChanged",
            "sa{sv}as",
            ["org.freedesktop.systemd1.Unit", changed, ["Conditions"]],
            path=UNIT,
            interface="org.freedesktop.DBus.Properties",
        )
        event = decode_signal(msg)
        assert isinstance(event, PropertiesChanged)
        assert event.unit_path == UNIT
        assert event.interface == "org.freedesktop.systemd1.Unit"
        assert dict(event.changed) == {
            "ActiveState": "active",
            "InvocationID": b"\x01\x02",
            "Job": [16, JOB],
            "Nested": "x",
        }
        assert event.invalidated == ("Conditions",)
        with pytest.raises(TypeError):
            # Mapping has no __setitem__ for mypy; at runtime the proxy must refuse it too.
            event.changed["ActiveState"] = "failed"  # type: ignore[index]

    @pytest.mark.parametrize(
        "msg",
        [
            _signal("StartupFinished", "tttttt", [0, 0, 0, 0, 0, 0]),
            _signal("JobNew", "us", [1, "x"]),  # wrong signature: never index into it
            _signal("UnitNew", "so", ["x.service", UNIT], path="/org/freedesktop/systemd1x"),
            _signal(
                "PropertiesChanged",
                "sa{sv}as",
                ["org.example", {}, []],
                path="/org/example",
                interface="org.freedesktop.DBus.Properties",
            ),
            _signal(
                "NameOwnerChanged",
                "sss",
                ["org.example.Other", "", ":1.5"],
                path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus",
                sender="org.freedesktop.DBus",
            ),
            _signal(
                "NameOwnerChanged",
                "sss",
                ["org.freedesktop.systemd1", "", ":1.5"],
                path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus",
                sender=":1.66",  # not the bus driver: a forgery
            ),
            Message(
                message_type=MessageType.METHOD_RETURN,
                reply_serial=1,
                signature="b",
                body=[True],
            ),
        ],
    )
    def test_ignored(self, msg: Message) -> None:
        """Unused, malformed, foreign and forged messages give None instead of raising."""
        assert decode_signal(msg) is None


class TestPlain:
    """Variant unwrapping leaves plain values alone."""

    @pytest.mark.parametrize(
        ("value", "expected"),
        [
            (Variant("as", ["a", "b"]), ["a", "b"]),
            ({"k": Variant("i", 3)}, {"k": 3}),
            ((Variant("b", True), "x"), (True, "x")),
            (b"\x00", b"\x00"),
            (7, 7),
        ],
    )
    def test_plain(self, value: object, expected: object) -> None:
        """Containers are rebuilt with unwrapped members; scalars pass through."""
        assert plain(value) == expected

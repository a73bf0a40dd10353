"""How manager.py reads unit records when units vanish or the manager fails mid-way."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, cast

import pytest
from dbus_fast import Variant

from provenanced.errors import ManagerCallError
from provenanced.systemd import manager
from provenanced.systemd.bus import ManagerConnection
from provenanced.systemd.names import unit_object_path

_PROPS = {
    "LoadState": Variant("s", "loaded"),
    "ActiveState": Variant("s", "active"),
    "SubState": Variant("s", "running"),
    "FragmentPath": Variant("s", "/u/a.service"),
    "DropInPaths": Variant("as", ["/u/a.service.d/x.conf"]),
    "SourcePath": Variant("s", ""),
    "NeedDaemonReload": Variant("b", True),
    "UnitFileState": Variant("s", "enabled"),
    "InvocationID": Variant("ay", bytes(range(16))),
}


class _ScriptedConnection:
    """Answers GetAll per unit path from a script: properties, an error name, or a hang."""

    max_in_flight = 4

    def __init__(self, script: dict[str, Any]) -> None:
        self.script = script
        self.cancelled = 0

    def as_conn(self) -> ManagerConnection:
        """This stand-in where a connection is expected; manager.py uses ``call`` and ``max_in_flight``."""
        return cast(ManagerConnection, self)

    async def call(
        self, member: str, signature: str = "", body: Sequence[Any] = (), **kw: Any
    ) -> list[Any]:
        answer = self.script[kw["path"]]
        if answer == "hang":
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        if isinstance(answer, str):
            raise ManagerCallError(f"{member} failed: {answer}", answer)
        return [answer]


class TestGetUnitRecords:
    """Records are read concurrently; gone units are skipped, other failures surface at once."""

    async def test_record_fields(self) -> None:
        """Every UnitRecord field comes from its property; InvocationID becomes hex."""
        conn = _ScriptedConnection({unit_object_path("a.service"): _PROPS})
        records = await manager.get_unit_records(conn.as_conn(), ["a.service"])
        record = records["a.service"]
        assert record.fragment_path == "/u/a.service"
        assert record.dropin_paths == ("/u/a.service.d/x.conf",)
        assert record.need_daemon_reload is True
        assert record.unit_file_state == "enabled"
        assert record.invocation_id == bytes(range(16)).hex()

    @pytest.mark.parametrize(
        "gone", ["org.freedesktop.systemd1.NoSuchUnit", "org.freedesktop.DBus.Error.UnknownObject"]
    )
    async def test_vanished_units_are_skipped(self, gone: str) -> None:
        """A unit that disappeared between listing and reading is left out, not fatal."""
        conn = _ScriptedConnection(
            {unit_object_path("a.service"): _PROPS, unit_object_path("b.service"): gone}
        )
        records = await manager.get_unit_records(
            conn.as_conn(), ["a.service", "b.service", "not a unit"]
        )
        assert list(records) == ["a.service"]

    async def test_failure_cancels_the_rest(self) -> None:
        """One real failure raises ManagerCallError and cancels the reads still waiting."""
        conn = _ScriptedConnection(
            {
                unit_object_path("a.service"): "hang",
                unit_object_path("b.service"): "org.freedesktop.DBus.Error.AccessDenied",
            }
        )
        async with asyncio.timeout(5):
            with pytest.raises(ManagerCallError, match="AccessDenied"):
                await manager.get_unit_records(conn.as_conn(), ["a.service", "b.service"])
        assert conn.cancelled == 1

"""Listen to the sandboxed manager while the daemon should be idle: did the manager do anything?

The daemon answers each finished job with a verification read, so "D-Bus calls while idle" only
means something once we know the manager ran no jobs and loaded or unloaded no units meanwhile.
This listener connects peer-to-peer on the private socket, so it does not socket-activate the
user bus (which would itself start a job).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from provenanced.errors import ManagerUnreachableError
from provenanced.sandbox import Sandbox
from provenanced.systemd import manager
from provenanced.systemd.bus import ManagerConnection, resolve_address


@dataclass(slots=True)
class ManagerActivity:
    """Jobs and unit (un)loads the manager signalled during a window."""

    jobs: Counter[str] = field(default_factory=Counter)
    loaded: Counter[str] = field(default_factory=Counter)
    units_unloaded: int = 0
    reloads: int = 0

    def describe(self) -> str:
        """One line for the table and the log."""
        jobs = ", ".join(f"{unit} x{n}" for unit, n in self.jobs.most_common(3))
        units = ", ".join(f"{unit} x{n}" for unit, n in self.loaded.most_common(3))
        return (
            f"{sum(self.jobs.values())} jobs{f' ({jobs})' if jobs else ''}, "
            f"{sum(self.loaded.values())} unit loads{f' ({units})' if units else ''}, "
            f"{self.units_unloaded} unloads, "
            f"{self.reloads} reloads"
        )


async def _watch(
    sandbox: Sandbox, seconds: float, start: Callable[[], object] | None
) -> ManagerActivity:
    activity = ManagerActivity()

    def on_event(event: manager.ManagerEvent) -> None:
        if isinstance(event, manager.JobRemoved):
            activity.jobs[event.unit] += 1
        elif isinstance(event, manager.UnitNew):
            activity.loaded[event.name] += 1
        elif isinstance(event, manager.UnitRemoved):
            activity.units_unloaded += 1
        elif isinstance(event, manager.Reloading) and event.active:
            activity.reloads += 1

    conn = await _connect(sandbox)
    try:
        await manager.subscribe(conn, on_event)
        if start is not None:
            await asyncio.to_thread(start)
        await asyncio.sleep(seconds)
    finally:
        await conn.close()
    return activity


async def _connect(sandbox: Sandbox, attempts: int = 5) -> ManagerConnection:
    """Connect, retrying: a manager flooding its private connections with signals can garble the
    reply to a pipelined AUTH ("auth line exceeded maximum size")."""
    for attempt in range(attempts):
        try:
            return await ManagerConnection.connect(resolve_address(None, sandbox.env))
        except ManagerUnreachableError:
            if attempt == attempts - 1:
                raise
            await asyncio.sleep(0.1)
    raise AssertionError("unreachable")


def watch(
    sandbox: Sandbox, seconds: float, start: Callable[[], object] | None = None
) -> ManagerActivity:
    """Block for ``seconds`` while recording what the manager signals; ``start`` runs once the
    listener is subscribed, so nothing it causes is missed."""
    return asyncio.run(_watch(sandbox, seconds, start))

"""Run a daemon's named loops in one TaskGroup until asked to stop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class _Shutdown(Exception):
    """Raised inside the task group to end it when ``stop`` is set."""


async def run_until(stop: asyncio.Event, start: Callable[[asyncio.TaskGroup], None]) -> None:
    """Start the loops with ``start`` in one TaskGroup and run them until ``stop`` is set.

    A loop that crashes cancels the others and its error surfaces: systemd restarts the daemon.
    """
    try:
        async with asyncio.TaskGroup() as tg:
            start(tg)
            await stop.wait()
            raise _Shutdown
    except* _Shutdown:
        pass

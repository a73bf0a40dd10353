"""One manager's inotify watches, and the backstop resync that stands in when they run out."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import Executor
from typing import Any

import structlog

from provenanced.config import PolicySettings
from provenanced.fs.watch import Overflow, UnitDirWatcher, WatchEvent, WatchLimitReached
from provenanced.model import Observation
from provenanced.sinks.metrics import Telemetry

log = structlog.get_logger("provenanced.watches")

Spawn = Callable[[Coroutine[Any, Any, None], str], None]


class Watches:
    """Watches the unit directories an observation lists, plus fixed places beside them.

    ``executor``: host mode's per-user thread; listing and placing watches runs there, so a hung
    mount of one user stalls only that user.
    """

    def __init__(
        self,
        extra_dirs: Sequence[str],
        on_event: Callable[[WatchEvent], None],
        telemetry: Telemetry,
        executor: Executor | None = None,
    ) -> None:
        self._extra_dirs = tuple(extra_dirs)
        self._on_event = on_event
        self._telemetry = telemetry
        self._executor = executor
        self._watcher: UnitDirWatcher | None = None
        self._limit_reached = asyncio.Event()  # the watcher ran out of watches

    @property
    def degraded(self) -> bool:
        """Some directory could not be watched (ENOSPC): the backstop stands in."""
        return bool(self._watcher and self._watcher.degraded)

    @property
    def count(self) -> int:
        """Watches in place."""
        return self._watcher.watch_count if self._watcher else 0

    async def follow(self, obs: Observation, spawn: Spawn) -> None:
        """Watch ``obs``'s unit directories: refresh the same ones, or start over for others."""
        roots = tuple(d.path for d in obs.unit_dirs)
        if self._watcher is not None and self._watcher.roots == roots:
            degraded = self._watcher.degraded
            await self._refresh(self._watcher)
            if degraded and not self._watcher.degraded:
                log.info("inotify.watches_restored", watches=self._watcher.watch_count)
            return
        self.close()
        self._watcher = UnitDirWatcher(roots, self._extra_dirs, self._executor)
        await self._refresh(self._watcher)
        spawn(self._deliver(self._watcher), "fs.watch")

    def close(self) -> None:
        """Remove every watch."""
        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None

    async def _refresh(self, watcher: UnitDirWatcher) -> None:
        if self._executor is None:
            watcher.refresh()
        else:
            await asyncio.get_running_loop().run_in_executor(self._executor, watcher.refresh)

    async def _deliver(self, watcher: UnitDirWatcher) -> None:
        with contextlib.suppress(ValueError, OSError):  # the watcher was closed and replaced
            async for event in watcher.events():
                if isinstance(event, Overflow):
                    self._telemetry.record_overflow()
                elif isinstance(event, WatchLimitReached):
                    log.warning("inotify.watch_limit", path=event.path)
                    self._limit_reached.set()
                self._on_event(event)

    async def backstop(
        self, policy: Callable[[], PolicySettings], resync: Callable[[], None]
    ) -> None:
        """A jittered full resync, more often while degraded (no watches)."""
        while True:
            settings = policy()
            interval = (
                settings.degraded_resync_interval if self.degraded else settings.resync_interval
            )
            # Losing the watches shortens the interval now, not after a sleep of the old length.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval * random.uniform(0.9, 1.1)):
                    await self._limit_reached.wait()
                    self._limit_reached.clear()
                    continue
            resync()

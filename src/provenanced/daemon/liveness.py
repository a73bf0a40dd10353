"""Whether the daemon's event loop still runs, asked from another thread (the HTTP server's).

A probe posts one no-op callback to the loop and waits for it; a loop blocked in synchronous work
cannot run it. Nothing ticks in between: an idle daemon pays nothing until someone asks.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from typing import Final

# The loop answers in milliseconds; one that has not run a callback for this long is stuck, well
# before systemd's watchdog (WatchdogSec=30s, pinged from the loop) kills it.
STALL_BOUND: Final = 5.0


class LoopProbe:
    """Asks, from any thread, how long the event loop has failed to run a posted callback."""

    def __init__(self, loop: asyncio.AbstractEventLoop, bound: float = STALL_BOUND) -> None:
        self._loop = loop
        self._bound = bound
        self._changed = threading.Condition()
        self._posted: float | None = None  # when the callback still waiting to run was posted
        self._runs = 0

    def stalled_for(self) -> float:
        """0.0 when the loop ran the callback within the bound, else the seconds it has waited.

        A probe waits at most the bound; while the loop stays stuck, the one callback stays
        posted, so later probes see its age at once instead of waiting again.
        """
        with self._changed:
            runs = self._runs
            if self._posted is None:
                try:
                    self._loop.call_soon_threadsafe(self._ran)
                except RuntimeError:  # the loop is closed: it will never run anything again
                    return math.inf
                self._posted = time.monotonic()
            posted = self._posted
            left = posted + self._bound - time.monotonic()
            if self._changed.wait_for(lambda: self._runs != runs, timeout=max(left, 0.0)):
                return 0.0
            return time.monotonic() - posted

    def _ran(self) -> None:
        with self._changed:
            self._posted = None
            self._runs += 1
            self._changed.notify_all()

"""The event-loop probe /-/healthy asks from the HTTP thread."""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Iterator

import pytest

from helpers import wait_until
from provenanced.daemon.liveness import LoopProbe


@pytest.fixture
def running_loop() -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop running in a thread of its own, stopped and closed afterwards."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


class TestLoopProbe:
    def test_a_running_loop_is_not_stalled(self, running_loop: asyncio.AbstractEventLoop) -> None:
        """The posted callback runs, so the probe reports 0.0, again and again."""
        probe = LoopProbe(running_loop, bound=30.0)
        assert [probe.stalled_for() for _ in range(3)] == [0.0, 0.0, 0.0]

    def test_a_loop_that_runs_nothing_is_stalled(self) -> None:
        """A loop that never gets to its callbacks is reported once the bound has passed."""
        loop = asyncio.new_event_loop()
        try:
            probe = LoopProbe(loop, bound=0.05)
            first = probe.stalled_for()
            assert first >= 0.05
            assert probe.stalled_for() >= first  # the same callback, still waiting
        finally:
            loop.close()

    def test_a_loop_stuck_in_a_callback_is_stalled_until_it_returns(
        self, running_loop: asyncio.AbstractEventLoop
    ) -> None:
        """A callback blocking the loop makes the probe report a stall; once it returns, 0.0."""
        release = threading.Event()
        running_loop.call_soon_threadsafe(release.wait, 30)  # synchronous work on the loop
        probe = LoopProbe(running_loop, bound=0.05)
        assert probe.stalled_for() >= 0.05
        release.set()
        wait_until(lambda: probe.stalled_for() == 0.0, message="the probe sees the loop again")

    def test_a_closed_loop_is_stalled_for_ever(self) -> None:
        """A closed loop will never run anything again."""
        loop = asyncio.new_event_loop()
        loop.close()
        assert LoopProbe(loop).stalled_for() == math.inf

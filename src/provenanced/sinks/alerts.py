"""Alerting: every transition counted and logged, one journal entry per finding per interval.

A flapping file must not flood the journal: the gate lets the first transition of a finding
through and holds later ones until its interval has passed; the last state wins.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import structlog

from provenanced.core.transitions import Key
from provenanced.model import Transition
from provenanced.sinks.journal import JournalSink
from provenanced.sinks.metrics import Telemetry

log = structlog.get_logger("provenanced.alerts")


@dataclass(slots=True)
class AlertGate:
    """Lets at most one alert per finding identity through per interval; the last state wins.

    A finding that opens and closes inside one interval is reported once, then its final state
    when the interval ends (only if that differs from what was last reported).
    """

    interval: float
    _last_sent: dict[Key, tuple[str, float]] = field(default_factory=dict)
    _held: dict[Key, Transition] = field(default_factory=dict)

    def offer(self, transition: Transition, now: float) -> Transition | None:
        """The transition to send now, or None when it is held back."""
        key = transition.finding.key
        sent = self._last_sent.get(key)
        if sent is not None and now - sent[1] < self.interval:
            if sent[0] == transition.state:
                self._held.pop(key, None)
            else:
                self._held[key] = transition
            return None
        self._held.pop(key, None)
        self._last_sent[key] = (transition.state, now)
        return transition

    def due(self, now: float) -> list[Transition]:
        """Held transitions whose interval has passed."""
        ready = [t for k, t in self._held.items() if now - self._last_sent[k][1] >= self.interval]
        for transition in ready:
            key = transition.finding.key
            del self._held[key]
            self._last_sent[key] = (transition.state, now)
        self._forget_resolved(now)
        return ready

    def next_due(self) -> float | None:
        """When the earliest held transition may go out."""
        times = [self._last_sent[k][1] + self.interval for k in self._held]
        return min(times) if times else None

    def _forget_resolved(self, now: float) -> None:
        stale = [
            k
            for k, (state, at) in self._last_sent.items()
            if state == "resolved" and now - at >= self.interval and k not in self._held
        ]
        for key in stale:
            del self._last_sent[key]


class Alerts:
    """Sends one manager's transitions to the metrics, the log and (rate-limited) the journal."""

    def __init__(self, journal: JournalSink, telemetry: Telemetry, interval: float) -> None:
        self.journal = journal
        self.gate = AlertGate(interval)
        self._telemetry = telemetry
        self._held = asyncio.Event()

    def send(self, transitions: Iterable[Transition]) -> None:
        """Count, log and send each transition, or hold it back for its interval."""
        for transition in transitions:
            self._telemetry.record_transition(transition)
            log.info(
                f"drift.{transition.state}",
                kind=transition.finding.kind.value,
                unit=transition.finding.unit,
                path=transition.finding.path,
            )
            sent = self.gate.offer(transition, time.monotonic())
            if sent is not None:
                self.journal.send_transition(sent)
            else:
                self._held.set()

    async def send_held(self) -> None:
        """Flush transitions the per-finding rate limit held back, once their interval passes."""
        while True:
            await self._held.wait()
            self._held.clear()
            while (due := self.gate.next_due()) is not None:
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                for transition in self.gate.due(time.monotonic()):
                    self.journal.send_transition(transition)

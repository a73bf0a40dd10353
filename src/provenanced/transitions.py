"""Findings over time: diff two sets into transitions, and keep a flapping file from flooding."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from provenanced.model import Finding, Transition

Key = tuple[object, str, str]


def diff(
    old: Mapping[Key, Finding], new: Iterable[Finding], now: float
) -> tuple[dict[Key, Finding], list[Transition]]:
    """The new open set (keeping each finding's ``since``) and what opened or closed."""
    current: dict[Key, Finding] = {}
    transitions: list[Transition] = []
    for finding in new:
        previous = old.get(finding.key)
        if previous is None:
            finding = replace(finding, since=now)
            transitions.append(Transition(finding, "detected"))
        else:
            finding = replace(finding, since=previous.since)
        current[finding.key] = finding
    transitions.extend(Transition(f, "resolved") for key, f in old.items() if key not in current)
    return current, transitions


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

"""The per-finding alert rate limit."""

from __future__ import annotations

from provenanced.model import Finding, FindingKind, Transition
from provenanced.sinks.alerts import AlertGate

A = Finding(FindingKind.LINK_REPLACED, "web.service", "/p", "warning", "latent")
B = Finding(FindingKind.STALE_LOAD, "web.service", "/p", "warning", "stale")


class TestAlertGate:
    def test_flapping_finding_sends_once_then_final_state(self) -> None:
        """Detected/resolved/detected within the interval: one alert now, nothing more if it ends open."""
        gate = AlertGate(interval=60)
        assert gate.offer(Transition(A, "detected"), 0) is not None
        assert gate.offer(Transition(A, "resolved"), 1) is None
        assert gate.offer(Transition(A, "detected"), 2) is None
        assert gate.due(61) == []
        assert gate.next_due() is None

    def test_held_resolution_goes_out_after_interval(self) -> None:
        """A resolution inside the interval is held and sent once the interval passes."""
        gate = AlertGate(interval=60)
        gate.offer(Transition(A, "detected"), 0)
        assert gate.offer(Transition(A, "resolved"), 5) is None
        assert gate.next_due() == 60
        assert gate.due(30) == []
        assert [t.state for t in gate.due(60)] == ["resolved"]

    def test_independent_identities(self) -> None:
        """The limit is per finding identity."""
        gate = AlertGate(interval=60)
        assert gate.offer(Transition(A, "detected"), 0) is not None
        assert gate.offer(Transition(B, "detected"), 0) is not None

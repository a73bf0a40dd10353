"""Transitions between finding sets."""

from __future__ import annotations

from provenanced.core.transitions import diff
from provenanced.model import Finding, FindingKind

A = Finding(FindingKind.LINK_REPLACED, "web.service", "/p", "warning", "latent")
B = Finding(FindingKind.STALE_LOAD, "web.service", "/p", "warning", "stale")


class TestDiff:
    def test_detected_and_resolved(self) -> None:
        """New findings are detected with since=now; vanished ones are resolved."""
        current, transitions = diff({}, [A], now=10.0)
        assert [(t.state, t.finding.since) for t in transitions] == [("detected", 10.0)]
        current, transitions = diff(current, [B], now=20.0)
        assert sorted((t.state, t.finding.kind.value) for t in transitions) == [
            ("detected", "stale-load"),
            ("resolved", "link-replaced"),
        ]

    def test_since_is_kept_while_open(self) -> None:
        """A finding that stays open keeps its original since and makes no transition."""
        current, _ = diff({}, [A], now=1.0)
        current, transitions = diff(current, [A], now=5.0)
        assert transitions == [] and current[A.key].since == 1.0

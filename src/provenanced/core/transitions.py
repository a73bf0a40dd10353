"""Findings over time: diff the open set against a new one into transitions."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace

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

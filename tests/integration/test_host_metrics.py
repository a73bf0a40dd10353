"""Host mode's /metrics against real users' managers: a user's series leave with them, and the
body is rendered once per change, not once per scrape."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemonkit import WAIT, eventually, http_get
from helpers import wait_until
from hostkit import host_settings, replace_link, running_host, user_has, user_ready
from provenanced.daemon.host import HostDaemon
from provenanced.model import FindingKind
from provenanced.sandbox import HostSandbox

pytestmark = [pytest.mark.integration, pytest.mark.host]


def _scrape(daemon: HostDaemon) -> list[tuple[str, dict[str, str], float]]:
    """Every sample on /metrics: name, labels, value."""
    assert daemon.http is not None
    status, body = http_get(daemon.http.address, "/metrics")
    assert status == 200
    return [
        (sample.name, sample.labels, sample.value)
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    ]


def _series_of(daemon: HostDaemon, user: str) -> set[str]:
    """The names of the series on /metrics labelled with ``user``."""
    return {name for name, labels, _ in _scrape(daemon) if labels.get("user") == user}


class _CountingCollector:
    """Yields nothing; counts how often the registry was rendered."""

    def __init__(self) -> None:
        self.renders = 0

    def collect(self) -> Iterator[Any]:
        self.renders += 1
        return iter(())


class TestDepartedUsers:
    async def test_a_users_series_leave_with_their_manager(
        self, host_sandbox: HostSandbox, tmp_path: Path
    ) -> None:
        """Counters, gauges and findings labelled with a user who left are gone from /metrics."""
        ivan, judy = host_sandbox.add_user(), host_sandbox.add_user()
        settings = host_settings(host_sandbox, tmp_path / "state", [ivan, judy])
        async with running_host(settings) as daemon:
            await eventually(lambda: user_ready(daemon, ivan) and user_ready(daemon, judy))
            path = replace_link(judy)
            await eventually(lambda: user_has(daemon, judy, FindingKind.LINK_REPLACED, path))
            name = judy.account.name
            detected = (
                "provenanced_findings_detected_total",
                {"user": name, "kind": "link-replaced"},
            )
            await eventually(
                lambda: any((n, labels) == detected and v >= 1 for n, labels, v in _scrape(daemon)),
                WAIT,
                "the detection counted for the user",
            )
            before = _series_of(daemon, name)
            assert {
                "provenanced_finding",
                "provenanced_ready",
                "provenanced_reloads_total",
            } <= before

            host_sandbox.remove_user(judy)
            await eventually(lambda: daemon.engine(name) is None, WAIT, "dropped")
            assert _series_of(daemon, name) == set()
            # The user who stays keeps theirs.
            assert {"provenanced_ready", "provenanced_reloads_total"} <= _series_of(
                daemon, ivan.account.name
            )


class TestRenderedOnce:
    async def test_scrapes_between_changes_render_once(
        self, host_sandbox: HostSandbox, tmp_path: Path
    ) -> None:
        """Two users idle: a second scrape serves the bytes of the first; a drift renders anew."""
        kate, leo = host_sandbox.add_user(), host_sandbox.add_user()
        settings = host_settings(host_sandbox, tmp_path / "state", [kate, leo])
        async with running_host(settings) as daemon:
            counting = _CountingCollector()
            daemon.telemetry.registry.register(counting)
            await eventually(lambda: user_ready(daemon, kate) and user_ready(daemon, leo))

            def served_from_cache() -> bool:
                _scrape(daemon)
                rendered = counting.renders
                _scrape(daemon)
                return counting.renders == rendered

            # Polled from a thread of its own: the engines go on running on this loop meanwhile.
            await asyncio.to_thread(wait_until, served_from_cache, WAIT, 0.1, "a cached scrape")
            path = replace_link(kate)
            await eventually(lambda: user_has(daemon, kate, FindingKind.LINK_REPLACED, path))
            rendered = counting.renders
            shown = [
                labels
                for name, labels, _ in _scrape(daemon)
                if name == "provenanced_finding"
                and (labels["kind"], labels["path"]) == ("link-replaced", str(path))
            ]
            assert [labels["user"] for labels in shown] == [kate.account.name]
            assert counting.renders == rendered + 1

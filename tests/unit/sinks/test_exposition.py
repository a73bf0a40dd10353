"""The /metrics body cache: rendered again only when the status or a counter moved."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry

from provenanced.model import DaemonStatus
from provenanced.sinks.exposition import Exposition


class _CountingCollector:
    """Yields nothing; counts how often the registry was rendered."""

    def __init__(self) -> None:
        self.renders = 0

    def collect(self) -> Iterator[Any]:
        self.renders += 1
        return iter(())


class TestHostStatuses:
    """Host mode hands a new mapping on every call; what keys the cache is what it holds."""

    def _exposition(self) -> tuple[Exposition, _CountingCollector, dict[str, DaemonStatus]]:
        registry = CollectorRegistry()
        counting = _CountingCollector()
        registry.register(counting)
        published = {"alice": DaemonStatus(), "bob": DaemonStatus()}

        def statuses() -> Mapping[str, DaemonStatus]:
            return dict(published)  # a fresh mapping each time, as HostDaemon.statuses gives

        return Exposition(registry, statuses, lambda: 0), counting, published

    def test_same_users_same_statuses_render_once(self) -> None:
        """Fresh mappings of the same status objects are the same status: one render."""
        exposition, counting, _ = self._exposition()
        exposition.render("", False)
        exposition.render("", False)
        assert counting.renders == 1

    def test_a_users_new_status_renders_again(self) -> None:
        """One user publishing a new status, even an equal one, renders anew."""
        exposition, counting, published = self._exposition()
        exposition.render("", False)
        published["bob"] = DaemonStatus()
        exposition.render("", False)
        assert counting.renders == 2

    def test_a_user_leaving_or_coming_renders_again(self) -> None:
        """A user gone, then one added: each change of the set of users renders anew."""
        exposition, counting, published = self._exposition()
        exposition.render("", False)
        carol = published.pop("bob")
        exposition.render("", False)
        published["carol"] = carol
        exposition.render("", False)
        assert counting.renders == 3

"""The /metrics body cache: rendered again only when the status or a counter moved."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.exposition import choose_encoder, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest

from provenanced.model import DaemonStatus
from provenanced.sinks import exposition as sinks_exposition
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


class TestFamilies:
    """A render after a change re-encodes only the families that moved, to the same bytes."""

    OPENMETRICS = "application/openmetrics-text; version=1.0.0"

    def _registry(self) -> tuple[CollectorRegistry, Counter, Gauge, list[int]]:
        registry = CollectorRegistry()
        moves = Counter("moves", "Moves.", ["kind"], registry=registry)
        level = Gauge("level", "Level.", registry=registry)
        version = [0]
        return registry, moves, level, version

    def test_every_render_equals_a_whole_encoding(self) -> None:
        """Text and OpenMetrics, after families move, appear and vanish: byte for byte the same."""
        registry, moves, level, version = self._registry()
        exposition = Exposition(registry, lambda: None, lambda: version[0])
        for accept, encode in (("", generate_latest), (self.OPENMETRICS, openmetrics_latest)):
            for step in range(4):
                moves.labels(kind=f"k{step % 2}").inc()
                level.set(step)
                if step == 2:
                    registry.unregister(level)
                version[0] += 1
                body, _ = exposition.render(accept, False)
                assert body == encode(registry)
            registry.register(level)

    def test_an_unchanged_family_is_not_encoded_again(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Only the family that moved is encoded anew; the other's bytes are reused."""
        encoded: list[str] = []

        def spying(accept: str) -> tuple[Callable[..., bytes], str]:
            encoder, content_type = choose_encoder(accept)

            def counted(collector: Any) -> bytes:
                encoded.extend(m.name for m in collector.collect())
                return encoder(collector)

            return counted, content_type

        monkeypatch.setattr(sinks_exposition, "choose_encoder", spying)
        registry, moves, level, version = self._registry()
        moves.labels(kind="k0").inc()
        exposition = Exposition(registry, lambda: None, lambda: version[0])
        exposition.render("", False)
        assert {"moves", "level"} <= set(encoded)
        encoded.clear()
        level.set(7)
        version[0] += 1
        body, _ = exposition.render("", False)
        assert body == generate_latest(registry)
        assert "level" in encoded and "moves" not in encoded

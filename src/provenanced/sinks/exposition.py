"""The /metrics body, rendered once per published status and counter change, not once per scrape.

A render re-encodes only the metric families that differ from the last render in the same format:
a change moves a few families of the thirty, and encoding was most of a change's CPU.
"""

from __future__ import annotations

import gzip
import threading
from collections.abc import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric

_Encoder = Callable[..., bytes]


class Exposition:
    """Renders ``registry`` and keeps the bytes until the status or a counter changes.

    ``version`` must move whenever a counter or histogram in the registry does; without it every
    scrape renders. The status is the same while it is the same object, or (host mode, a new
    mapping per call) while it maps the same users to the same status objects. The key is read
    before rendering, so a body may be newer than its key but never older: a change during a
    render costs one more render, never a stale scrape.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        get_status: Callable[[], object],
        version: Callable[[], int] | None = None,
    ) -> None:
        self._registry = registry
        self._get_status = get_status
        self._version = version
        self._lock = threading.Lock()  # scrapes arriving together after a change render once
        # (content type, gzipped) → the status and counter version it was rendered at, and bytes
        self._cache: dict[tuple[str, bool], tuple[object, int, bytes]] = {}
        self._families: dict[str, _Families] = {}  # content type → its families as last encoded

    def render(self, accept: str, gzipped: bool) -> tuple[bytes, str]:
        """The body for this ``Accept`` header, gzip-compressed when asked, and its content type."""
        encoder, content_type = choose_encoder(accept)
        if self._version is None:
            body = encoder(self._registry)
            return (gzip.compress(body) if gzipped else body), content_type
        fmt = (content_type, gzipped)
        with self._lock:
            status, version = self._get_status(), self._version()
            cached = self._cache.get(fmt)
            if cached is not None and _same(cached[0], status) and cached[1] == version:
                return cached[2], content_type
            families = self._families.get(content_type)
            if families is None:
                families = self._families[content_type] = _Families(encoder)
            body = families.encode(self._registry.collect())
            if gzipped:
                body = gzip.compress(body)
            self._cache[fmt] = (status, version, body)
            return body, content_type


def _same(old: object, new: object) -> bool:
    """Whether a status is unchanged: the same object, or a mapping of the same objects."""
    if old is new:
        return True
    if not isinstance(old, Mapping) or not isinstance(new, Mapping) or old.keys() != new.keys():
        return False
    return all(old[key] is new[key] for key in old)


class _One:
    """One metric family as the encoders take it: something with ``collect()``."""

    def __init__(self, metrics: Iterable[Metric]) -> None:
        self._metrics = tuple(metrics)

    def collect(self) -> Iterable[Metric]:
        return self._metrics


class _Families:
    """Each family's bytes in one format, kept while the family is equal to what was encoded."""

    def __init__(self, encoder: _Encoder) -> None:
        self._encoder = encoder
        # What the encoder adds after the last family (OpenMetrics: "# EOF"), found, not assumed.
        self._tail = encoder(_One(()))
        self._encoded: dict[str, tuple[Metric, bytes]] = {}

    def encode(self, metrics: Iterable[Metric]) -> bytes:
        """The whole body: the families equal to last time as they were, the others anew."""
        encoded: dict[str, tuple[Metric, bytes]] = {}
        for metric in metrics:
            last = self._encoded.get(metric.name)
            if last is None or last[0] != metric:
                body = self._encoder(_One((metric,)))
                last = (metric, body[: len(body) - len(self._tail)])
            encoded[metric.name] = last
        self._encoded = encoded  # families no longer collected are forgotten
        return b"".join(body for _, body in encoded.values()) + self._tail

"""Prometheus metrics: event counters the engine records, plus one collector rendering its status.

Everything lives on a private ``CollectorRegistry`` (never the global ``REGISTRY``), so tests and
the daemon each get their own set of series and nothing else in the process can leak into it.
Over 400 lines on purpose: every series the daemon exports is declared here with its help text,
the one place the README's metrics table is checked against.
"""

from __future__ import annotations

import copy
import functools
import itertools
import platform
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Final, Literal, ParamSpec, TypeVar, cast

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily, Metric

from provenanced import __version__
from provenanced.model import DaemonStatus, FindingKind, Transition
from provenanced.sinks.journal import AlertResult

KINDS: Final[tuple[str, ...]] = tuple(kind.value for kind in FindingKind)
# The LoadState values systemd documents; any other value the manager reports is added as seen.
LOAD_STATES: Final = ("loaded", "not-found", "bad-setting", "error", "masked", "stub", "merged")
# The triggers the engine reports (stale-load found via NeedDaemonReload, or via content hash).
RELOAD_TRIGGERS: Final = ("need-daemon-reload", "content-hash")
ALERT_SINKS: Final = ("journal",)
DETECTION_LATENCY_BUCKETS: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
RESYNC_BUCKETS: Final = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

_Metric = TypeVar("_Metric", Counter, Histogram)
P = ParamSpec("P")

ActionResult = Literal["ok", "failed"]
# A reload may also be held back: a job is queued or a defer_while_active unit is activating.
ReloadResult = Literal["ok", "failed", "deferred"]
ACTION_RESULTS: Final[tuple[ActionResult, ...]] = ("ok", "failed")
RELOAD_RESULTS: Final[tuple[ReloadResult, ...]] = ("ok", "failed", "deferred")
ALERT_RESULTS: Final[tuple[AlertResult, ...]] = ("ok", "error")


def _counts(method: Callable[P, None]) -> Callable[P, None]:
    """Mark a Telemetry method that moves a counter or histogram: it moves ``version``."""

    @functools.wraps(method)
    def counted(*args: P.args, **kwargs: P.kwargs) -> None:
        telemetry = cast("Telemetry", args[0])
        if telemetry._retired:
            return
        method(*args, **kwargs)
        telemetry._version.move()

    return counted


class _Version:
    """A number that moves with every recorded event; shared by every user's view."""

    def __init__(self) -> None:
        self._ticks = itertools.count(1)
        self.value = 0

    def move(self) -> None:
        # A fresh number, never a read-modify-write: sinks may record from a worker thread.
        self.value = next(self._ticks)


class Telemetry:
    """The engine's event counters and histograms, on a registry it owns with the status collector.

    Label sets whose values are known up front start at 0, so ``increase()`` and ``rate()`` see
    the first event instead of a series that appears already at 1.
    """

    def __init__(
        self,
        get_status: Callable[[], DaemonStatus | Mapping[str, DaemonStatus]],
        *,
        reload_triggers: Iterable[str] = RELOAD_TRIGGERS,
        host: bool = False,
    ) -> None:
        self.registry = CollectorRegistry()
        self._version = _Version()
        reg = self.registry
        # Host mode: every series names its user; ``for_user`` gives the view an engine records to.
        user: list[str] = ["user"] if host else []
        self._user: dict[str, str] = {}
        self._retired = False
        # This view's labelled D-Bus call counters, by method and result: looked up once each.
        self._dbus_children: dict[tuple[str, str], Counter] = {}
        self._reload_triggers = tuple(reload_triggers)
        self._detected = Counter(
            "provenanced_findings_detected",
            "Findings that opened (a drift appeared), by drift kind.",
            [*user, "kind"],
            registry=reg,
        )
        self._resolved = Counter(
            "provenanced_findings_resolved",
            "Findings that closed (the drift went away or was healed), by drift kind.",
            [*user, "kind"],
            registry=reg,
        )
        self._reloads = Counter(
            "provenanced_reloads",
            "daemon-reload requests sent to the user manager, by what triggered them and outcome.",
            [*user, "trigger", "result"],
            registry=reg,
        )
        self._heals = Counter(
            "provenanced_heals",
            "Attempts to restore a drifted file to its expected state, by drift kind and outcome.",
            [*user, "kind", "result"],
            registry=reg,
        )
        self._jobs_unverified = Counter(
            "provenanced_jobs_unverified",
            "Jobs the manager reported done whose unit did not verify (still failed, condition "
            "unmet or non-zero exit).",
            labelnames=user,
            registry=reg,
        )
        self._resync = Histogram(
            "provenanced_resync_duration_seconds",
            "Time a full re-read of the manager's units and their files took.",
            buckets=RESYNC_BUCKETS,
            labelnames=user,
            registry=reg,
        )
        self._latency = Histogram(
            "provenanced_detection_latency_seconds",
            "Time from the oldest change in a re-check batch to its findings being published. "
            "Changes are inotify events, manager signals (unit loaded or removed, reload done, "
            "manager restarted) and full resyncs asked for by an inotify overflow, a new Home "
            "Manager generation, a heal, a config reload, a retry or the backstop.",
            buckets=DETECTION_LATENCY_BUCKETS,
            labelnames=user,
            registry=reg,
        )
        self._dbus_calls = Counter(
            "provenanced_dbus_calls",
            "D-Bus method calls made to the user manager, by method and outcome.",
            [*user, "method", "result"],
            registry=reg,
        )
        self._reconnects = Counter(
            "provenanced_dbus_reconnects",
            "Lost connections to the user manager and failed connection attempts; each is "
            "followed by another attempt after a backoff.",
            labelnames=user,
            registry=reg,
        )
        self._overflows = Counter(
            "provenanced_inotify_overflows",
            "inotify queue overflows; each one forces a full rescan because events were lost.",
            labelnames=user,
            registry=reg,
        )
        self._alerts = Counter(
            "provenanced_alerts",
            "Notifications handed to an alert sink (e.g. journald), by sink and outcome.",
            [*user, "sink", "result"],
            registry=reg,
        )
        self._per_user: tuple[Counter | Histogram, ...] = (
            self._detected, self._resolved, self._reloads, self._heals, self._jobs_unverified,
            self._resync, self._latency, self._dbus_calls, self._reconnects, self._overflows,
            self._alerts,
        )  # fmt: skip
        if not host:
            self._preinitialise(self._reload_triggers)
        reg.register(StatusCollector(get_status))

    @property
    def version(self) -> int:
        """Moves with every counter and histogram, so /metrics knows when to render again."""
        return self._version.value

    def for_user(self, name: str) -> Telemetry:
        """The view an engine following ``name``'s manager records to: same series, its label."""
        view = copy.copy(self)
        view._user = {"user": name}
        view._dbus_children = {}
        view._preinitialise(self._reload_triggers)
        return view

    def retire(self) -> None:
        """Remove every series of this view's user, whose manager left, and record no more.

        A departed user's series would otherwise stay on /metrics, and alerts on them with it.
        """
        self._retired = True  # an engine still stopping records nothing that would bring them back
        for metric in self._per_user:
            metric.remove_by_labels(self._user)
        self._version.move()

    def _labels(self, metric: _Metric, **labels: str) -> _Metric:
        """The child of ``metric`` for ``labels`` plus this view's user (if any)."""
        labels = {**self._user, **labels}
        return metric.labels(**labels) if labels else metric

    def _preinitialise(self, reload_triggers: tuple[str, ...]) -> None:
        """Create every label set whose values are known, at 0."""
        for metric in (self._jobs_unverified, self._reconnects, self._overflows):
            if self._user:
                self._labels(metric)
        for kind in KINDS:
            self._labels(self._detected, kind=kind)
            self._labels(self._resolved, kind=kind)
            for action_result in ACTION_RESULTS:
                self._labels(self._heals, kind=kind, result=action_result)
        for trigger in reload_triggers:
            for reload_result in RELOAD_RESULTS:
                self._labels(self._reloads, trigger=trigger, result=reload_result)
        for sink in ALERT_SINKS:
            for alert_result in ALERT_RESULTS:
                self._labels(self._alerts, sink=sink, result=alert_result)

    @_counts
    def record_transition(self, t: Transition) -> None:
        """Count a finding that opened or closed."""
        counter = self._detected if t.state == "detected" else self._resolved
        self._labels(counter, kind=t.finding.kind.value).inc()

    @_counts
    def record_reload(self, trigger: str, result: ReloadResult) -> None:
        """Count one daemon-reload request and its outcome."""
        self._labels(self._reloads, trigger=trigger, result=result).inc()

    @_counts
    def record_heal(self, kind: str, result: ActionResult) -> None:
        """Count one heal attempt and its outcome; ``kind`` is a FindingKind or its value."""
        self._labels(self._heals, kind=str(kind), result=result).inc()

    @_counts
    def record_job_unverified(self) -> None:
        """Count one job that ended ``done`` but whose unit did not verify."""
        self._labels(self._jobs_unverified).inc()

    @_counts
    def observe_resync(self, seconds: float) -> None:
        """Record how long one full resync took."""
        self._labels(self._resync).observe(seconds)

    @_counts
    def observe_detection_latency(self, seconds: float) -> None:
        """Record the delay from the oldest change of a re-check batch to its findings."""
        self._labels(self._latency).observe(seconds)

    @_counts
    def record_dbus_call(self, method: str, result: str) -> None:
        """Count one D-Bus call to the manager and its outcome ("ok", "error" or "timeout")."""
        child = self._dbus_children.get((method, result))
        if child is None:
            child = self._dbus_children[method, result] = self._labels(
                self._dbus_calls, method=method, result=result
            )
        child.inc()

    @_counts
    def record_reconnect(self) -> None:
        """Count one lost connection or failed connection attempt."""
        self._labels(self._reconnects).inc()

    @_counts
    def record_overflow(self) -> None:
        """Count one inotify queue overflow."""
        self._labels(self._overflows).inc()

    @_counts
    def record_alert(self, sink: str, result: AlertResult) -> None:
        """Count one notification handed to an alert sink; matches ``JournalSink``'s on_result."""
        self._labels(self._alerts, sink=sink, result=result).inc()


class StatusCollector:
    """Renders one ``DaemonStatus`` snapshot per scrape; nothing carries over between scrapes.

    ``collect()`` runs on the HTTP thread: it calls ``get_status`` exactly once and only reads the
    immutable value it gets, so it needs no lock and does no I/O. In host mode ``get_status``
    gives one status per user name and every series gains a ``user`` label.
    """

    def __init__(self, get_status: Callable[[], DaemonStatus | Mapping[str, DaemonStatus]]) -> None:
        self._get_status = get_status
        self._build_labels = {"version": __version__, "python": platform.python_version()}

    def describe(self) -> Iterator[Metric]:
        """The families this collector yields, so the registry can reject duplicate names."""
        return self._families(DaemonStatus())

    def collect(self) -> Iterator[Metric]:
        """Every family, rebuilt from one snapshot."""
        return self._families(self._get_status())

    def _families(self, got: DaemonStatus | Mapping[str, DaemonStatus]) -> Iterator[Metric]:
        yield InfoMetricFamily(
            "provenanced_build",
            "The running provenanced version and the Python it runs on (value is always 1).",
            value=self._build_labels,
        )
        if isinstance(got, DaemonStatus):
            rows: list[tuple[list[str], DaemonStatus]] = [([], got)]
            extra: list[str] = []
        else:
            rows = [([_label(user)], status) for user, status in sorted(got.items())]
            extra = ["user"]
        yield _flag(
            "provenanced_manager_connected",
            "1 while connected to the systemd user manager; 0 means drift in loaded units is "
            "not being seen.",
            extra,
            [(labels, s.manager_connected) for labels, s in rows],
        )
        transport = InfoMetricFamily(
            "provenanced_manager_transport",
            "How the manager is reached: 'private' socket or the user 'bus' (value is always 1).",
            labels=[*extra, "transport"],
        )
        for labels, status in rows:
            if status.transport:
                transport.add_metric([*labels, status.transport], {})
        yield transport
        yield _flag(
            "provenanced_ready",
            "1 once the first full audit completed and findings are being published.",
            extra,
            [(labels, s.ready) for labels, s in rows],
        )
        yield _flag(
            "provenanced_stale",
            "1 when the published findings may be out of date (manager lost, resync pending).",
            extra,
            [(labels, s.behind) for labels, s in rows],
        )
        yield _flag(
            "provenanced_degraded",
            "1 while inotify watches are exhausted and a full resync every "
            "policy.degraded_resync_interval stands in for them.",
            extra,
            [(labels, s.degraded) for labels, s in rows],
        )
        yield _flag(
            "provenanced_activation_in_progress",
            "1 while a Home Manager activation runs: findings, reloads and heals wait for its end.",
            extra,
            [(labels, s.activation_in_progress) for labels, s in rows],
        )
        yield _flag(
            "provenanced_activation_stuck",
            "1 when an activation outlived policy.activation_timeout and was judged as it stands.",
            extra,
            [(labels, s.activation_stuck) for labels, s in rows],
        )
        yield _units(extra, rows)
        yield from _findings(extra, rows)
        yield _gauge(
            "provenanced_inotify_watches",
            "inotify watches currently held on unit directories.",
            extra,
            [(labels, s.inotify_watches) for labels, s in rows],
        )
        yield _gauge(
            "provenanced_last_full_resync_timestamp_seconds",
            "Unix time the last full resync finished; 0 before the first one.",
            extra,
            [(labels, s.last_full_resync) for labels, s in rows],
        )


def _gauge(
    name: str, documentation: str, extra: list[str], rows: list[tuple[list[str], float]]
) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=extra)
    for labels, value in rows:
        family.add_metric(labels, value)
    return family


def _flag(
    name: str, documentation: str, extra: list[str], rows: list[tuple[list[str], bool]]
) -> GaugeMetricFamily:
    return _gauge(name, documentation, extra, [(labels, 1.0 if v else 0.0) for labels, v in rows])


def _units(extra: list[str], rows: list[tuple[list[str], DaemonStatus]]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(
        "provenanced_units",
        "User units the manager has loaded, by LoadState (0 for documented states with none).",
        labels=[*extra, "load_state"],
    )
    for labels, status in rows:
        counts = dict.fromkeys(LOAD_STATES, 0) | dict(status.units_by_load_state)
        for state, count in counts.items():
            family.add_metric([*labels, _label(state)], count)
    return family


def _findings(
    extra: list[str], rows: list[tuple[list[str], DaemonStatus]]
) -> Iterator[GaugeMetricFamily]:
    """One series per open finding, plus a dense count for every drift kind."""
    per_finding = GaugeMetricFamily(
        "provenanced_finding",
        "1 for each open finding: a file behind a user unit that drifted from what vouches for it.",
        labels=[*extra, "kind", "unit", "path", "severity"],
    )
    dense = GaugeMetricFamily(
        "provenanced_findings",
        "Open findings by drift kind (0 for kinds with none).",
        labels=[*extra, "kind"],
    )
    for labels, status in rows:
        counts = dict.fromkeys(KINDS, 0)
        seen: set[tuple[FindingKind, str, str]] = set()
        for finding in status.findings:
            # Identity is (kind, unit, path); a duplicate would make the scrape invalid.
            if finding.key in seen:
                continue
            seen.add(finding.key)
            counts[finding.kind.value] += 1
            values = [finding.kind.value, _label(finding.unit), _label(finding.path)]
            per_finding.add_metric([*labels, *values, finding.severity], 1)
        for kind, count in counts.items():
            dense.add_metric([*labels, kind], count)
    yield per_finding
    yield dense


def _label(value: str) -> str:
    """A label value that encodes as UTF-8 even when a path held undecodable bytes."""
    return value.encode("utf-8", "backslashreplace").decode("utf-8")

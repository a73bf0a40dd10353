"""Telemetry counters and the status collector, read back through ``registry.get_sample_value``."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest
from prometheus_client import REGISTRY, CollectorRegistry

from provenanced import __version__
from provenanced.model import DaemonStatus, Finding, FindingKind, Severity, Transition
from provenanced.sinks.metrics import LOAD_STATES, StatusCollector, Telemetry

KINDS = list(FindingKind)


def _finding(
    kind: FindingKind = FindingKind.LINK_REPLACED,
    unit: str = "a.service",
    *,
    path: str | None = None,
    severity: Severity = "warning",
) -> Finding:
    path = path if path is not None else f"/home/u/.config/systemd/user/{unit}"
    return Finding(kind, unit, path, severity, "divergent")


class _Status:
    """A swappable status reference, the way the engine publishes one."""

    def __init__(self, status: DaemonStatus | None = None) -> None:
        self.value = status or DaemonStatus()
        self.calls = 0

    def __call__(self) -> DaemonStatus:
        self.calls += 1
        return self.value


def _registry(status: DaemonStatus) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(StatusCollector(lambda: status))
    return registry


class TestTelemetry:
    def test_uses_its_own_registry(self) -> None:
        """Telemetry never registers on the process-global REGISTRY."""
        telemetry = Telemetry(_Status())
        assert telemetry.registry is not REGISTRY
        assert (
            REGISTRY.get_sample_value("provenanced_findings_detected_total", {"kind": "masked"})
            is None
        )

    def test_two_instances_do_not_collide(self) -> None:
        """Each Telemetry holds its own series, so tests and daemons can make several."""
        first, second = Telemetry(_Status()), Telemetry(_Status())
        first.record_overflow()
        assert first.registry.get_sample_value("provenanced_inotify_overflows_total") == 1
        assert second.registry.get_sample_value("provenanced_inotify_overflows_total") == 0

    @pytest.mark.parametrize("kind", KINDS)
    def test_finding_counters_start_at_zero_for_every_kind(self, kind: FindingKind) -> None:
        """Detected, resolved and heal series exist at 0 before any event."""
        reg = Telemetry(_Status()).registry
        labels = {"kind": kind.value}
        assert reg.get_sample_value("provenanced_findings_detected_total", labels) == 0
        assert reg.get_sample_value("provenanced_findings_resolved_total", labels) == 0
        for result in ("ok", "failed"):
            heal = {"kind": kind.value, "result": result}
            assert reg.get_sample_value("provenanced_heals_total", heal) == 0

    def test_default_reload_triggers_are_the_engines(self) -> None:
        """By default the engine's two reload triggers start at 0 for both outcomes."""
        reg = Telemetry(_Status()).registry
        for trigger in ("need-daemon-reload", "content-hash"):
            labels = {"trigger": trigger, "result": "failed"}
            assert reg.get_sample_value("provenanced_reloads_total", labels) == 0

    def test_known_reload_and_alert_label_sets_start_at_zero(self) -> None:
        """Reload triggers given at construction and the journal sink are pre-initialised."""
        reg = Telemetry(_Status(), reload_triggers=("content-hash", "manual")).registry
        for trigger in ("content-hash", "manual"):
            for result in ("ok", "failed"):
                labels = {"trigger": trigger, "result": result}
                assert reg.get_sample_value("provenanced_reloads_total", labels) == 0
        for result in ("ok", "error"):
            labels = {"sink": "journal", "result": result}
            assert reg.get_sample_value("provenanced_alerts_total", labels) == 0

    @pytest.mark.parametrize("kind", KINDS)
    def test_record_transition_counts_by_state_and_kind(self, kind: FindingKind) -> None:
        """A detected transition bumps detected, a resolved one bumps resolved, per kind."""
        telemetry = Telemetry(_Status())
        finding = _finding(kind)
        telemetry.record_transition(Transition(finding, "detected"))
        telemetry.record_transition(Transition(finding, "detected"))
        telemetry.record_transition(Transition(finding, "resolved"))
        reg = telemetry.registry
        assert reg.get_sample_value("provenanced_findings_detected_total", {"kind": kind}) == 2
        assert reg.get_sample_value("provenanced_findings_resolved_total", {"kind": kind}) == 1

    def test_event_counters(self) -> None:
        """Each record_* method bumps exactly its own series."""
        telemetry = Telemetry(_Status())
        telemetry.record_reload("content-hash", "failed")
        telemetry.record_heal(FindingKind.LINK_REPLACED, "ok")
        telemetry.record_heal("masked", "failed")
        telemetry.record_job_unverified()
        telemetry.record_dbus_call("GetAll", "timeout")
        telemetry.record_reconnect()
        telemetry.record_overflow()
        telemetry.record_alert("journal", "error")
        reg = telemetry.registry
        expected = {
            ("provenanced_reloads_total", (("trigger", "content-hash"), ("result", "failed"))): 1,
            ("provenanced_reloads_total", (("trigger", "content-hash"), ("result", "ok"))): 0,
            ("provenanced_heals_total", (("kind", "link-replaced"), ("result", "ok"))): 1,
            ("provenanced_heals_total", (("kind", "masked"), ("result", "failed"))): 1,
            ("provenanced_jobs_unverified_total", ()): 1,
            ("provenanced_dbus_calls_total", (("method", "GetAll"), ("result", "timeout"))): 1,
            ("provenanced_dbus_reconnects_total", ()): 1,
            ("provenanced_inotify_overflows_total", ()): 1,
            ("provenanced_alerts_total", (("sink", "journal"), ("result", "error"))): 1,
            ("provenanced_alerts_total", (("sink", "journal"), ("result", "ok"))): 0,
        }
        for (name, labels), value in expected.items():
            assert reg.get_sample_value(name, dict(labels)) == value, (name, labels)

    def test_detection_latency_buckets_span_1ms_to_10s(self) -> None:
        """Latency buckets run from 1 ms to 10 s, so both a fast path and a slow one show."""
        telemetry = Telemetry(_Status())
        telemetry.observe_detection_latency(0.0005)
        telemetry.observe_detection_latency(7.0)
        reg = telemetry.registry
        name = "provenanced_detection_latency_seconds_bucket"
        assert reg.get_sample_value(name, {"le": "0.001"}) == 1
        assert reg.get_sample_value(name, {"le": "5.0"}) == 1
        assert reg.get_sample_value(name, {"le": "10.0"}) == 2
        assert reg.get_sample_value("provenanced_detection_latency_seconds_count") == 2

    def test_resync_histogram(self) -> None:
        """A resync duration lands in the histogram's sum and count."""
        telemetry = Telemetry(_Status())
        telemetry.observe_resync(0.25)
        reg = telemetry.registry
        assert reg.get_sample_value("provenanced_resync_duration_seconds_sum") == 0.25
        assert reg.get_sample_value("provenanced_resync_duration_seconds_count") == 1

    def test_status_collector_is_registered(self) -> None:
        """The status families are served from the same registry as the counters."""
        status = _Status(DaemonStatus(ready=True))
        reg = Telemetry(status).registry
        assert reg.get_sample_value("provenanced_ready") == 1


class TestStatusCollector:
    def test_build_info(self) -> None:
        """build_info carries the package version and the Python version."""
        reg = _registry(DaemonStatus())
        labels = {"version": __version__, "python": platform.python_version()}
        assert reg.get_sample_value("provenanced_build_info", labels) == 1

    @pytest.mark.parametrize(
        ("field", "metric"),
        [
            ("manager_connected", "provenanced_manager_connected"),
            ("ready", "provenanced_ready"),
            ("behind", "provenanced_stale"),
            ("degraded", "provenanced_degraded"),
            ("activation_in_progress", "provenanced_activation_in_progress"),
            ("activation_stuck", "provenanced_activation_stuck"),
        ],
    )
    @pytest.mark.parametrize("value", [False, True])
    def test_flags(self, field: str, metric: str, value: bool) -> None:
        """Each boolean of the status is a 0/1 gauge."""
        reg = _registry(DaemonStatus(**{field: value}))  # type: ignore[arg-type]
        assert reg.get_sample_value(metric) == float(value)

    def test_transport_info_only_when_known(self) -> None:
        """The transport info series names the transport in use, and is absent when unknown."""
        reg = _registry(DaemonStatus(transport="private"))
        name = "provenanced_manager_transport_info"
        assert reg.get_sample_value(name, {"transport": "private"}) == 1
        assert _registry(DaemonStatus()).get_sample_value(name, {"transport": ""}) is None

    def test_gauges(self) -> None:
        """Watches and the last resync time are read straight from the status."""
        reg = _registry(DaemonStatus(inotify_watches=42, last_full_resync=1700000000.5))
        assert reg.get_sample_value("provenanced_inotify_watches") == 42
        assert (
            reg.get_sample_value("provenanced_last_full_resync_timestamp_seconds") == 1700000000.5
        )

    def test_units_are_dense_over_documented_load_states(self) -> None:
        """Every documented LoadState has a series (0 when none), plus any other state reported."""
        reg = _registry(DaemonStatus(units_by_load_state={"loaded": 7, "exotic": 1}))
        assert reg.get_sample_value("provenanced_units", {"load_state": "loaded"}) == 7
        assert reg.get_sample_value("provenanced_units", {"load_state": "exotic"}) == 1
        for state in LOAD_STATES:
            if state != "loaded":
                assert reg.get_sample_value("provenanced_units", {"load_state": state}) == 0

    @pytest.mark.parametrize("kind", KINDS)
    def test_one_series_per_open_finding(self, kind: FindingKind) -> None:
        """Each open finding is a finding{kind,unit,path,severity} series with value 1."""
        finding = _finding(kind, severity="critical")
        reg = _registry(DaemonStatus(findings=(finding,)))
        labels = {
            "kind": kind.value,
            "unit": finding.unit,
            "path": finding.path,
            "severity": "critical",
        }
        assert reg.get_sample_value("provenanced_finding", labels) == 1
        assert reg.get_sample_value("provenanced_findings", {"kind": kind.value}) == 1

    def test_findings_are_dense(self) -> None:
        """findings{kind} has a 0 for every kind without findings and counts the others."""
        findings = (
            _finding(FindingKind.MASKED, "a.service"),
            _finding(FindingKind.MASKED, "b.service"),
            _finding(FindingKind.STALE_LOAD, "a.service"),
        )
        reg = _registry(DaemonStatus(findings=findings))
        expected = {kind.value: 0 for kind in FindingKind} | {"masked": 2, "stale-load": 1}
        for kind, count in expected.items():
            assert reg.get_sample_value("provenanced_findings", {"kind": kind}) == count

    def test_no_stale_label_sets_after_findings_close(self) -> None:
        """Once a finding closes its series is gone on the next scrape and its count drops to 0."""
        open_finding = _finding(FindingKind.LINK_DANGLING)
        status = _Status(DaemonStatus(findings=(open_finding,)))
        reg = CollectorRegistry()
        reg.register(StatusCollector(status))
        labels = {
            "kind": "link-dangling",
            "unit": open_finding.unit,
            "path": open_finding.path,
            "severity": open_finding.severity,
        }
        assert reg.get_sample_value("provenanced_finding", labels) == 1
        status.value = DaemonStatus()
        assert reg.get_sample_value("provenanced_finding", labels) is None
        assert reg.get_sample_value("provenanced_findings", {"kind": "link-dangling"}) == 0
        assert not [s for m in reg.collect() if m.name == "provenanced_finding" for s in m.samples]

    def test_duplicate_identity_is_exposed_once(self) -> None:
        """Two findings with one identity give one series, not an invalid scrape."""
        first = _finding(FindingKind.MASKED, severity="warning")
        second = _finding(FindingKind.MASKED, severity="critical")
        reg = _registry(DaemonStatus(findings=(first, second)))
        samples = [s for m in reg.collect() if m.name == "provenanced_finding" for s in m.samples]
        assert len(samples) == 1
        assert reg.get_sample_value("provenanced_findings", {"kind": "masked"}) == 1

    def test_undecodable_path_bytes_still_encode(self) -> None:
        """A path with undecodable bytes (surrogate escapes) becomes a backslash-escaped label."""
        finding = _finding(path="/home/u/\udcffbad.service")
        reg = _registry(DaemonStatus(findings=(finding,)))
        samples = [s for m in reg.collect() if m.name == "provenanced_finding" for s in m.samples]
        assert samples[0].labels["path"] == "/home/u/\\udcffbad.service"
        samples[0].labels["path"].encode("utf-8")

    def test_collect_reads_one_snapshot(self) -> None:
        """A scrape calls get_status exactly once; registering calls it not at all."""
        status = _Status(DaemonStatus(findings=(_finding(),)))
        reg = CollectorRegistry()
        reg.register(StatusCollector(status))
        assert status.calls == 0
        list(reg.collect())
        assert status.calls == 1

    def test_every_family_has_help_and_the_prefix(self) -> None:
        """Every metric is prefixed provenanced_ and carries a HELP text an operator can read."""
        reg = Telemetry(_Status(DaemonStatus(findings=(_finding(),)))).registry
        families = list(reg.collect())
        assert len(families) >= 20
        for family in families:
            assert family.name.startswith("provenanced_"), family.name
            assert len(family.documentation) > 20, family.name


README = Path(__file__).resolve().parents[3] / "README.md"


class TestWhatIsCounted:
    @pytest.mark.parametrize(
        ("name", "counted"),
        [
            ("provenanced_dbus_reconnects_total", ("lost", "failed connection attempts")),
            (
                "provenanced_detection_latency_seconds",
                ("inotify", "manager signal", "overflow", "config reload", "retry", "backstop"),
            ),
        ],
    )
    def test_help_and_readme_name_every_source(self, name: str, counted: tuple[str, ...]) -> None:
        """HELP and the README's metrics table both name every event the engine feeds in."""
        families = {f.name: f for f in Telemetry(_Status()).registry.collect()}
        help_text = families[name.removesuffix("_total")].documentation.lower()
        (row,) = [
            line for line in README.read_text().splitlines() if line.startswith(f"| `{name}`")
        ]
        for words in counted:
            assert words in help_text, (words, help_text)
            assert words in row.lower(), (words, row)


class TestHostMode:
    """In host mode every per-user series carries ``user``; the build info does not."""

    def test_status_series_are_labelled_per_user(self) -> None:
        """Each user's findings, readiness and connection appear under their name only."""
        statuses = {
            "alice": DaemonStatus(findings=(_finding(),), ready=True, manager_connected=True),
            "bob": DaemonStatus(),
        }
        telemetry = Telemetry(lambda: statuses, host=True)
        get = telemetry.registry.get_sample_value
        path = "/home/u/.config/systemd/user/a.service"
        labels = {"kind": "link-replaced", "unit": "a.service", "path": path}
        assert get("provenanced_finding", {"user": "alice", **labels, "severity": "warning"}) == 1
        assert get("provenanced_finding", {"user": "bob", **labels, "severity": "warning"}) is None
        assert get("provenanced_findings", {"user": "bob", "kind": "link-replaced"}) == 0
        assert get("provenanced_ready", {"user": "alice"}) == 1
        assert get("provenanced_ready", {"user": "bob"}) == 0
        assert get("provenanced_manager_connected", {"user": "bob"}) == 0
        assert get("provenanced_ready") is None
        assert (
            get(
                "provenanced_build_info",
                {"version": __version__, "python": platform.python_version()},
            )
            == 1
        )

    def test_counters_record_through_the_users_view(self) -> None:
        """for_user starts that user's known label sets at 0 and counts under their name."""
        telemetry = Telemetry(dict, host=True)
        alice = telemetry.for_user("alice")
        alice.record_transition(Transition(_finding(), "detected"))
        alice.record_reconnect()
        alice.observe_detection_latency(0.01)
        get = telemetry.registry.get_sample_value
        assert (
            get("provenanced_findings_detected_total", {"user": "alice", "kind": "link-replaced"})
            == 1
        )
        assert get("provenanced_findings_detected_total", {"user": "alice", "kind": "masked"}) == 0
        assert get("provenanced_dbus_reconnects_total", {"user": "alice"}) == 1
        assert get("provenanced_detection_latency_seconds_count", {"user": "alice"}) == 1
        assert get("provenanced_findings_detected_total", {"user": "bob", "kind": "masked"}) is None

    def test_a_retired_view_takes_its_users_series_and_records_no_more(self) -> None:
        """retire() removes every series of that user, moves the version, and later events of
        an engine still stopping bring none back; other users keep theirs."""
        telemetry = Telemetry(dict, host=True)
        alice, bob = telemetry.for_user("alice"), telemetry.for_user("bob")
        for view in (alice, bob):
            view.record_reload("content-hash", "failed")
            view.observe_resync(0.2)
            view.record_dbus_call("GetAll", "ok")
        version = telemetry.version

        alice.retire()
        alice.record_reconnect()
        alice.record_alert("journal", "ok")
        users = {
            sample.labels.get("user")
            for family in telemetry.registry.collect()
            for sample in family.samples
        }
        assert users == {None, "bob"}
        assert telemetry.version > version
        failed = {"user": "bob", "trigger": "content-hash", "result": "failed"}
        assert telemetry.registry.get_sample_value("provenanced_reloads_total", failed) == 1

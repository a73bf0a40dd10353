"""promtool on the shipped alert rules, their unit tests, and a real scrape of /metrics."""

from __future__ import annotations

import http.client
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from provenanced.model import DaemonStatus, Finding, FindingKind, Transition
from provenanced.sinks.http import HttpServer, start_http_server
from provenanced.sinks.metrics import Telemetry

pytestmark = pytest.mark.integration

PROMETHEUS = Path(__file__).parents[2] / "packaging" / "prometheus"
RULES = PROMETHEUS / "provenanced-alerts.yml"
RULE_TESTS = PROMETHEUS / "provenanced-alerts.test.yml"
HOME_UNITS = "/home/u/.config/systemd/user"


def _promtool(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["promtool", *args], input=stdin, capture_output=True, timeout=120, check=False
    )


def _status() -> DaemonStatus:
    """A status with findings of every severity, including label values that need escaping."""
    findings = (
        Finding(FindingKind.LINK_REPLACED, "web.service", f"{HOME_UNITS}/web.service", "critical",
                "divergent"),
        Finding(FindingKind.UNMANAGED_DROPIN, "web.service",
                "/etc/systemd/user/web.service.d/override.conf", "warning", ""),
        Finding(FindingKind.STALE_LOAD, "backup.timer", f"{HOME_UNITS}/backup.timer", "info",
                "hash differs"),
        Finding(FindingKind.UNSAFE_MODE, 'odd"unit\\x.service', f'{HOME_UNITS}/odd"\n\\é\udcff',
                "warning", "mode 0666"),
    )  # fmt: skip
    return DaemonStatus(
        findings=findings,
        units_by_load_state={"loaded": 40, "not-found": 2},
        manager_connected=True,
        transport="private",
        ready=True,
        inotify_watches=12,
        last_full_resync=1_700_000_000.0,
        units_audited=42,
    )


@pytest.fixture(scope="module")
def server() -> Iterator[HttpServer]:
    """A real endpoint whose telemetry has seen some of every kind of event."""
    status = _status()
    telemetry = Telemetry(lambda: status)
    for finding in status.findings:
        telemetry.record_transition(Transition(finding, "detected"))
    telemetry.record_transition(Transition(status.findings[0], "resolved"))
    telemetry.record_reload("content-hash", "ok")
    telemetry.record_reload("need-daemon-reload", "failed")
    telemetry.record_heal(FindingKind.LINK_REPLACED, "ok")
    telemetry.record_job_unverified()
    telemetry.observe_resync(0.3)
    telemetry.observe_detection_latency(0.004)
    telemetry.record_dbus_call("GetAll", "ok")
    telemetry.record_dbus_call("Reload", "timeout")
    telemetry.record_reconnect()
    telemetry.record_overflow()
    telemetry.record_alert("journal", "ok")
    endpoint = start_http_server("127.0.0.1:0", telemetry.registry, lambda: status)
    yield endpoint
    endpoint.stop()


@pytest.fixture(scope="module")
def host_server() -> Iterator[HttpServer]:
    """A host-mode endpoint: two users' statuses and counters, each series labelled with its user."""
    statuses = {"alice": _status(), "bob": DaemonStatus(manager_connected=False)}
    telemetry = Telemetry(lambda: statuses, host=True)
    for name in statuses:
        view = telemetry.for_user(name)
        view.record_reload("content-hash", "failed")
        view.observe_resync(0.3)
        view.record_dbus_call("GetAll", "ok")
    endpoint = start_http_server(
        "127.0.0.1:0", telemetry.registry, lambda: statuses, version=lambda: telemetry.version
    )
    yield endpoint
    endpoint.stop()


def _scrape(server: HttpServer, accept: str = "") -> bytes:
    conn = http.client.HTTPConnection(*server.address, timeout=10)
    try:
        conn.request("GET", "/metrics", headers={"Accept": accept} if accept else {})
        response = conn.getresponse()
        assert response.status == 200
        return response.read()
    finally:
        conn.close()


class TestRules:
    def test_rules_are_valid(self) -> None:
        """promtool check rules accepts the alert file."""
        result = _promtool("check", "rules", str(RULES))
        assert result.returncode == 0, result.stdout + result.stderr
        assert b"SUCCESS" in result.stdout

    def test_rule_unit_tests_pass(self) -> None:
        """Every alert's firing and not-firing cases pass under promtool test rules."""
        result = subprocess.run(
            ["promtool", "test", "rules", RULE_TESTS.name],
            cwd=PROMETHEUS,
            capture_output=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert b"SUCCESS" in result.stdout

    def test_every_alert_has_a_test(self) -> None:
        """Each alert named in the rules appears in the unit tests."""
        alerts = {
            line.split(":", 1)[1].strip()
            for line in RULES.read_text().splitlines()
            if line.strip().startswith("- alert:")
        }
        tested = RULE_TESTS.read_text()
        assert alerts == {
            "ProvenancedDriftDetected",
            "ProvenancedStaleLoadLingering",
            "ProvenancedReloadsFailing",
            "ProvenancedManagerDisconnected",
            "ProvenancedActivationStuck",
            "ProvenancedDown",
            "ProvenancedAbsent",
        }
        for alert in alerts:
            assert f"alertname: {alert}" in tested, alert


class TestScrape:
    def test_check_metrics_is_silent(self, server: HttpServer) -> None:
        """promtool check metrics finds nothing to lint in a real scrape: no output at all."""
        result = _promtool("check", "metrics", stdin=_scrape(server))
        assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")

    def test_openmetrics_scrape_parses(self, server: HttpServer) -> None:
        """The OpenMetrics rendering parses strictly, with the escaped label values intact."""
        body = _scrape(server, "application/openmetrics-text; version=1.0.0").decode()
        families = {f.name: f for f in text_string_to_metric_families(body)}
        paths = {s.labels["path"] for s in families["provenanced_finding"].samples}
        assert f'{HOME_UNITS}/odd"\n\\é\\udcff' in paths
        assert len(families["provenanced_findings"].samples) == len(FindingKind)

    def test_scrape_is_the_status(self, server: HttpServer) -> None:
        """The scrape carries one finding series per open finding and the dense counts."""
        lines = _scrape(server).decode().splitlines()
        findings = [line for line in lines if line.startswith("provenanced_finding{")]
        assert len(findings) == 4
        assert 'provenanced_findings{kind="stale-load"} 1.0' in lines
        assert 'provenanced_findings{kind="masked"} 0.0' in lines

    def test_host_mode_scrape_is_silent_and_per_user(self, host_server: HttpServer) -> None:
        """promtool check metrics finds nothing to lint with the user label; the series the
        rules alert on carry it."""
        body = _scrape(host_server)
        result = _promtool("check", "metrics", stdin=body)
        assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")
        lines = body.decode().splitlines()
        assert 'provenanced_manager_connected{user="bob"} 0.0' in lines
        assert 'provenanced_findings{kind="stale-load",user="alice"} 1.0' in lines
        failed = 'provenanced_reloads_total{result="failed",trigger="content-hash",user="bob"} 1.0'
        assert failed in lines

"""A real Prometheus scrapes `provenanced run` on a sandboxed user manager and fires its alerts."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prom import Prometheus, answers, copy_rules, get_json, log_tail, stop_process
from systemd import journal

from helpers import free_port, wait_until
from provenanced.sandbox import Sandbox

pytestmark = pytest.mark.e2e

# DESIGN §5: fixed forever, so spelled out here rather than imported from the sink.
DRIFT_DETECTED = "602394dfbeaf4f2796fcbdeea0b459bf"
DRIFT_RESOLVED = "c6977927e6464702ae1d8e2ade0a959d"
CONNECTION_LOST = "b5b3468fbee347e6af9e7756e7db3884"

WEB = "podman-web.service"
# Every `for:` in the rules copy; the shipped 1m-15m windows are too long for a test.
RULE_WINDOW = 3.0
# Detection (quiet window), one scrape, one evaluation and slack for a loaded CI machine.
MARGIN = 15.0


class Daemon:
    """`python -m provenanced run` as a child, on a free loopback port."""

    def __init__(self, sandbox: Sandbox, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {
            **sandbox.env,
            "PROVENANCED_METRICS__LISTEN": f"127.0.0.1:{self.port}",
            "PROVENANCED_POLICY__QUIET_WINDOW": "0.2",
            # Every transition must reach journald, however quickly the test flips a finding.
            "PROVENANCED_POLICY__ALERT_MIN_INTERVAL": "0",
            "PROVENANCED_LOG__FORMAT": "logfmt",
        }
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "provenanced", "run"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Poll /-/ready (after the first full audit), failing at once if the daemon died."""

        def ready() -> bool:
            assert self.proc.poll() is None, f"provenanced exited:\n{log_tail(self.log)}"
            return answers(f"{self.url}/-/ready")

        wait_until(ready, timeout=timeout, interval=0.1, message="provenanced /-/ready")

    def findings(self) -> list[dict[str, Any]]:
        """The daemon's open findings as /api/v1/findings serves them."""
        document = get_json(f"{self.url}/api/v1/findings") or {}
        found: list[dict[str, Any]] = document.get("findings", [])
        return found


class Stack:
    """The sandboxed manager, the daemon watching it and the Prometheus scraping the daemon."""

    def __init__(self, sandbox: Sandbox, daemon: Daemon, prometheus: Prometheus) -> None:
        self.sandbox, self.daemon, self.prometheus = sandbox, daemon, prometheus

    def explain(self) -> str:
        """Both logs, for an assertion message."""
        return (
            f"--- provenanced:\n{log_tail(self.daemon.log)}\n"
            f"--- prometheus:\n{log_tail(self.prometheus.log)}"
        )

    def wait_alert(self, state: str | None, name: str, **labels: str) -> None:
        """Poll /api/v1/alerts until the alert is in state (None: not active), within the window."""
        wait_until(
            lambda: self.prometheus.alert_state(name, **labels) == state,
            timeout=RULE_WINDOW + MARGIN,
            interval=0.2,
            message=f"{name} {labels} in state {state}\n{self.explain()}",
        )


def _mentioning(text: str) -> list[int]:
    """Pids whose command line or environment mentions text: what teardown must leave none of."""
    needle = text.encode()
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = Path(entry.path, "cmdline").read_bytes()
            environ = Path(entry.path, "environ").read_bytes()
        except OSError:
            continue
        if needle in cmdline or needle in environ:
            pids.append(int(entry.name))
    return pids


@pytest.fixture
def stack(fresh_sandbox: Sandbox, journald: object, tmp_path: Path) -> Iterator[Stack]:
    """Daemon and Prometheus started for one test, both stopped and checked gone afterwards."""
    daemon = Daemon(fresh_sandbox, tmp_path / "provenanced.log")
    prometheus: Prometheus | None = None
    try:
        daemon.wait_ready()
        rules = copy_rules(tmp_path / "provenanced-alerts.yml", f"{RULE_WINDOW:g}s")
        prometheus = Prometheus(tmp_path, f"127.0.0.1:{daemon.port}", rules)
        prometheus.wait_ready()
        stack = Stack(fresh_sandbox, daemon, prometheus)
        wait_until(
            lambda: prometheus.target_health() == "up",
            timeout=MARGIN,
            interval=0.2,
            message=f"the provenanced target up in /api/v1/targets\n{stack.explain()}",
        )
        yield stack
    finally:
        if prometheus is not None:
            prometheus.stop()
        stop_process(daemon.proc)
    # Prometheus names tmp_path on its command line, the daemon the sandbox in its environment.
    assert _mentioning(str(tmp_path)) == []
    assert _mentioning(str(fresh_sandbox.state_dir)) == []


def journal_entries(message_id: str, **matches: str) -> list[dict[str, Any]]:
    """Entries read back with the real journal reader, matching MESSAGE_ID and the fields given."""
    reader = journal.Reader()
    try:
        reader.add_match(MESSAGE_ID=message_id, **matches)
        return list(reader)
    finally:
        reader.close()


def wait_journal(message_id: str, **matches: str) -> dict[str, Any]:
    """Poll the journal until one such entry is there and return it."""
    entries = wait_until(
        lambda: journal_entries(message_id, **matches),
        timeout=MARGIN,
        interval=0.1,
        message=f"journal entry MESSAGE_ID={message_id} {matches}",
    )
    entry: dict[str, Any] = entries[-1]
    return entry


def replace_with_file(path: Path, content: str) -> None:
    """Put a regular file where the managed link was, in one rename, as an editor would save."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    tmp.write_text(content)
    os.replace(tmp, path)


def replace_with_link(path: Path, target: str) -> None:
    """Put the managed link back, in one rename, as Home Manager's activation does."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    tmp.symlink_to(target)
    os.replace(tmp, path)


class TestDriftAlert:
    def test_link_replaced_fires_and_resolves(self, stack: Stack) -> None:
        """A replaced managed link fires ProvenancedDriftDetected and journals; repair resolves both."""
        path = stack.sandbox.config_dir / WEB
        target = os.readlink(path)
        labels = {"kind": "link-replaced", "unit": WEB, "path": str(path)}
        assert stack.prometheus.alerts("ProvenancedDriftDetected", path=str(path)) == []

        # Different content: the `divergent` detail, a critical finding, the paging rule.
        replace_with_file(path, path.read_text().replace("on-failure", "always"))
        stack.wait_alert("firing", "ProvenancedDriftDetected", **labels)
        (alert,) = stack.prometheus.alerts("ProvenancedDriftDetected", **labels)
        assert alert["labels"]["severity"] == "critical"
        assert alert["labels"]["job"] == "provenanced"
        assert alert["annotations"]["summary"] == f"Critical drift in {WEB}: link-replaced"
        # The edited fragment is also stale-load until the daemon reloads: match the kind too.
        journaled = {"PROVENANCED_PATH": str(path), "PROVENANCED_KIND": "link-replaced"}
        detected = wait_journal(DRIFT_DETECTED, **journaled)
        assert detected["_PID"] == stack.daemon.proc.pid
        assert detected["PROVENANCED_DETAIL"].startswith("divergent")
        assert detected["USER_UNIT"] == WEB
        assert detected["SYSLOG_IDENTIFIER"] == "provenanced"
        assert detected["PRIORITY"] == 2

        replace_with_link(path, target)
        stack.wait_alert(None, "ProvenancedDriftDetected", **labels)
        resolved = wait_journal(DRIFT_RESOLVED, **journaled)
        assert resolved["_PID"] == stack.daemon.proc.pid
        assert not any(f["path"] == str(path) for f in stack.daemon.findings())


class TestHealthAlerts:
    def test_manager_lost_then_daemon_down(self, stack: Stack) -> None:
        """The manager gone fires ProvenancedManagerDisconnected; the daemon gone, ProvenancedDown."""
        assert stack.prometheus.alerts("ProvenancedManagerDisconnected") == []
        assert stack.prometheus.alerts("ProvenancedDown") == []

        stack.sandbox.systemctl("exit")
        stack.wait_alert("firing", "ProvenancedManagerDisconnected", job="provenanced")
        lost = wait_journal(CONNECTION_LOST, _PID=str(stack.daemon.proc.pid))
        assert lost["SYSLOG_IDENTIFIER"] == "provenanced"

        assert stop_process(stack.daemon.proc) == 0, stack.explain()
        stack.wait_alert("firing", "ProvenancedDown", job="provenanced")
        # The daemon's series went stale with it, so the alert on them is resolved.
        stack.wait_alert(None, "ProvenancedManagerDisconnected", job="provenanced")

"""A real Prometheus scrapes `provenanced run --host` following two real users, and its alert
rules fire for the user whose unit drifted, and for no one else."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prom import Prometheus, answers, copy_rules, get_json, log_tail, stop_process

from helpers import free_port, wait_until
from hostkit import UNIT, replace_link, restore_link
from provenanced.sandbox import HostSandbox, UserSandbox

pytestmark = [pytest.mark.e2e, pytest.mark.host]

# Every `for:` in the rules copy, as in the user-mode e2e; the shipped 1m-15m are too long here.
RULE_WINDOW = 3.0
# Detection (quiet window), one scrape, one evaluation and slack for a loaded CI machine.
MARGIN = 15.0
DRIFT = "ProvenancedDriftDetected"


class HostDaemonProcess:
    """`python -m provenanced run --host` as a root child following only the given users."""

    def __init__(self, host: HostSandbox, users: list[UserSandbox], workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "provenanced.log"
        self.names = {u.account.name for u in users}
        config = workdir / "config.toml"
        config.write_text(
            "[host]\n"
            f"runtime_root = {json.dumps(str(host.runtime_root))}\n"
            f"state_root = {json.dumps(str(workdir / 'state'))}\n"
            f"allow_users = {json.dumps(sorted(self.names))}\n"
            "[metrics]\n"
            f'listen = "127.0.0.1:{self.port}"\n'
            "[policy]\n"
            "quiet_window = 0.2\n"
            "alert_min_interval = 0\n"
            "[log]\n"
            'format = "logfmt"\n'
        )
        argv = [sys.executable, "-m", "provenanced", "--config", str(config), "run", "--host"]
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=host.env
            )

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Both users followed and /-/ready (every user's first audit done, managers connected)."""

        def ready() -> bool:
            assert self.proc.poll() is None, f"provenanced exited:\n{log_tail(self.log)}"
            users = (get_json(f"{self.url}/api/v1/findings") or {}).get("users", {})
            return set(users) == self.names and answers(f"{self.url}/-/ready")

        wait_until(ready, timeout=timeout, interval=0.1, message="provenanced --host ready")


class Stack:
    """Two users' managers, the host daemon following them and the Prometheus scraping it."""

    def __init__(
        self, users: tuple[UserSandbox, UserSandbox], daemon: HostDaemonProcess, prom: Prometheus
    ) -> None:
        self.users, self.daemon, self.prometheus = users, daemon, prom

    def explain(self) -> str:
        """Both logs as they are now, for an assertion message."""
        return (
            f"--- provenanced:\n{log_tail(self.daemon.log)}\n"
            f"--- prometheus:\n{log_tail(self.prometheus.log)}"
        )

    def wait(self, predicate: Callable[[], object], what: str) -> None:
        """Poll within the rule window; on failure say what and show both logs."""
        try:
            wait_until(predicate, timeout=RULE_WINDOW + MARGIN, interval=0.2, message=what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.explain()}") from None

    def by_user(self, expr: str) -> dict[str, float]:
        """An instant query's value for each user, as Prometheus has scraped it."""
        data = self.prometheus.api(f"query?query={urllib.parse.quote(expr)}") or {}
        return {r["metric"]["user"]: float(r["value"][1]) for r in data.get("result", [])}

    def drift_alerts(self) -> list[dict[str, Any]]:
        """Active ProvenancedDriftDetected alerts for the drift this test makes."""
        return self.prometheus.alerts(DRIFT, kind="link-replaced", unit=UNIT)


@pytest.fixture
def stack(host_sandbox: HostSandbox, journald: object, tmp_path: Path) -> Iterator[Stack]:
    """Two users, the host daemon and Prometheus for one test; all stopped afterwards."""
    users = (host_sandbox.add_user(), host_sandbox.add_user())
    daemon = HostDaemonProcess(host_sandbox, list(users), tmp_path)
    prometheus: Prometheus | None = None
    try:
        daemon.wait_ready()
        rules = copy_rules(tmp_path / "provenanced-alerts.yml", f"{RULE_WINDOW:g}s")
        prometheus = Prometheus(tmp_path, f"127.0.0.1:{daemon.port}", rules)
        prometheus.wait_ready()
        stack = Stack(users, daemon, prometheus)
        stack.wait(lambda: prometheus.target_health() == "up", "the host target up")
        yield stack
    finally:
        if prometheus is not None:
            prometheus.stop()
        assert stop_process(daemon.proc) == 0, log_tail(daemon.log)
        for user in users:
            if user in host_sandbox.users:
                host_sandbox.remove_user(user)


class TestHostAlerts:
    def test_drift_fires_for_its_user_only_and_resolves(self, stack: Stack) -> None:
        """Per-user gauges for both users; alice's drift fires for alice alone; repair resolves."""
        alice, bob = stack.users
        names = {alice.account.name, bob.account.name}
        stack.wait(
            lambda: stack.by_user("provenanced_ready") == dict.fromkeys(names, 1.0),
            "provenanced_ready 1 for each user",
        )
        stack.wait(
            lambda: stack.by_user("provenanced_manager_connected") == dict.fromkeys(names, 1.0),
            "provenanced_manager_connected 1 for each user",
        )
        assert stack.drift_alerts() == []

        target = os.readlink(alice.config_dir / UNIT)
        path = replace_link(alice)
        stack.wait(
            lambda: (
                stack.prometheus.alert_state(DRIFT, user=alice.account.name, path=str(path))
                == "firing"
            ),
            f"{DRIFT} firing for {alice.account.name}",
        )
        (alert,) = stack.drift_alerts()
        assert alert["labels"]["user"] == alice.account.name
        assert alert["labels"]["severity"] == "critical"
        summary = f"Critical drift in {UNIT} of user {alice.account.name}: link-replaced"
        assert alert["annotations"]["summary"] == summary
        # bob's unit is the same one, untouched: none of his findings fires anything.
        assert stack.prometheus.alerts(DRIFT, user=bob.account.name) == []
        assert stack.by_user('provenanced_findings{kind="link-replaced"}') == {
            alice.account.name: 1.0,
            bob.account.name: 0.0,
        }

        restore_link(alice, target)
        stack.wait(lambda: stack.drift_alerts() == [], f"{DRIFT} resolved")
        assert stack.prometheus.alerts(DRIFT, user=bob.account.name) == []

    def test_a_user_who_leaves_takes_their_series(
        self, stack: Stack, host_sandbox: HostSandbox
    ) -> None:
        """bob's manager leaves: Prometheus sees none of his series any more, alice keeps hers."""
        alice, bob = stack.users
        per_name = 'count by (user) ({__name__=~"provenanced_.+", user!=""})'
        stack.wait(
            lambda: set(stack.by_user(per_name)) == {alice.account.name, bob.account.name},
            "both users' series scraped",
        )
        host_sandbox.remove_user(bob)
        stack.wait(
            lambda: set(stack.by_user(per_name)) == {alice.account.name},
            f"no series of {bob.account.name} left",
        )
        assert stack.prometheus.alerts("ProvenancedManagerDisconnected") == []

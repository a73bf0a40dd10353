"""A real Prometheus server for end-to-end tests: its config, its process and its HTTP API."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from helpers import free_port, wait_until

RULES = Path(__file__).parents[2] / "packaging" / "prometheus" / "provenanced-alerts.yml"
JOB = "provenanced"
_FOR_LINE = re.compile(r"^(?P<indent>[ \t]+)for:[ \t]*\S+[ \t]*$", re.MULTILINE)
_STOP_GRACE = 15.0


def get_json(url: str) -> Any:
    """GET a JSON document; None while the server does not answer (yet, or any more)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return json.load(reply)
    except (OSError, urllib.error.URLError, ValueError):
        return None


def answers(url: str) -> bool:
    """Whether a GET of url returns 2xx now."""
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            status: int = reply.status
    except (OSError, urllib.error.URLError):
        return False
    return 200 <= status < 300


def copy_rules(dest: Path, for_duration: str) -> Path:
    """Copy the shipped alert rules with every `for:` set to for_duration.

    The shipped windows (1m to 15m) are what operators want; a test cannot wait that long, and
    what it checks (expression, labels, pending → firing → resolved) does not depend on them.
    """
    text, count = _FOR_LINE.subn(rf"\g<indent>for: {for_duration}", RULES.read_text())
    assert count > 0, f"no `for:` lines found in {RULES}"
    dest.write_text(f"# Copy of {RULES.name}; every `for:` shortened to {for_duration}.\n{text}")
    return dest


def stop_process(proc: subprocess.Popen[bytes], sig: signal.Signals = signal.SIGTERM) -> int:
    """Signal a child, SIGKILL it after a grace period, and reap it; returns its exit status."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout=_STOP_GRACE)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=_STOP_GRACE)
    return proc.returncode


def log_tail(path: Path, lines: int = 30) -> str:
    """The end of a child's log, to say in a failure message why it misbehaved."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class Prometheus:
    """One `prometheus` process scraping a single target in job "provenanced"."""

    def __init__(self, workdir: Path, target: str, rules: Path) -> None:
        binary = shutil.which("prometheus")
        assert binary is not None, "prometheus is not on PATH (Debian: apt-get install prometheus)"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "prometheus.log"
        config = workdir / "prometheus.yml"
        config.write_text(
            "global:\n"
            "  scrape_interval: 1s\n"
            "  scrape_timeout: 1s\n"
            "  evaluation_interval: 1s\n"
            f"rule_files:\n  - {json.dumps(str(rules))}\n"
            "scrape_configs:\n"
            f"  - job_name: {JOB}\n"
            f"    static_configs:\n      - targets: [{json.dumps(target)}]\n"
        )
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={workdir / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=workdir,
            )

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Poll /-/ready, failing at once with its log if the server died."""

        def ready() -> bool:
            assert self.proc.poll() is None, f"prometheus exited:\n{log_tail(self.log)}"
            return answers(f"{self.url}/-/ready")

        wait_until(ready, timeout=timeout, interval=0.1, message="prometheus /-/ready")

    def api(self, path: str) -> Any:
        """The `data` of a successful API reply, None otherwise."""
        reply = get_json(f"{self.url}/api/v1/{path}")
        if not isinstance(reply, dict) or reply.get("status") != "success":
            return None
        return reply["data"]

    def target_health(self) -> str | None:
        """Health of the provenanced target as Prometheus last saw it ("up", "down", "unknown")."""
        data = self.api("targets?state=active") or {}
        for target in data.get("activeTargets", []):
            if target["labels"].get("job") == JOB:
                health: str = target["health"]
                return health
        return None

    def alerts(self, name: str, **labels: str) -> list[dict[str, Any]]:
        """Active (pending or firing) alerts called name whose labels include labels."""
        data = self.api("alerts") or {}
        return [
            alert
            for alert in data.get("alerts", [])
            if alert["labels"].get("alertname") == name
            and all(alert["labels"].get(k) == v for k, v in labels.items())
        ]

    def alert_state(self, name: str, **labels: str) -> str | None:
        """ "firing", "pending", or None when no such alert is active."""
        states = {alert["state"] for alert in self.alerts(name, **labels)}
        return "firing" if "firing" in states else next(iter(states), None)

    def stop(self) -> int:
        """SIGTERM, then SIGKILL after a grace period; returns the exit status."""
        return stop_process(self.proc)

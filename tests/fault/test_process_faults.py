"""Faults that need the daemon as a real process: SIGHUP, exhausted watches, no DAC override."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from daemonkit import DaemonProcess, config_toml, daemon_process, http_get, poll, unit_file
from helpers import free_port
from provenanced.sandbox import Sandbox

pytestmark = pytest.mark.fault


def _paths(proc: DaemonProcess, kind: str) -> set[str]:
    return {f["path"] for f in proc.findings() if f["kind"] == kind}


def _one_record(line: str) -> bool:
    """A whole logfmt record, or an alert journald could not take (one JSON object on stderr)."""
    if line.startswith("{"):
        return bool(json.loads(line)["event"] == "journal.send_failed")
    return line.startswith("timestamp=")


def _events(proc: DaemonProcess, event: str) -> list[str]:
    """Log lines of one event: logfmt puts timestamp, level and event first on every line."""
    pattern = re.compile(rf"^timestamp=\S+ level=\S+ event={re.escape(event)}(\s|$)")
    return [line for line in proc.log().splitlines() if pattern.match(line)]


class TestSighupWithBrokenConfig:
    def test_broken_config_keeps_the_old_one_and_logs_one_error(
        self, fresh_sandbox: Sandbox, tmp_path: Path
    ) -> None:
        """SIGHUP with an unparsable or invalid config: the process stays, logs one error, keeps the old config."""
        sandbox = fresh_sandbox
        healing = config_toml(
            sandbox, "[policy]", "quiet_window = 0.2", "[policy.heal]", 'link-replaced = "heal"'
        )
        path = sandbox.config_dir / "backup.timer"
        target = os.readlink(path)
        with daemon_process(sandbox, tmp_path, healing) as proc:
            # A drop-in name that would forge a log line if the log did not escape newlines
            # (systemd reads any *.conf in a .d directory; a unit file needs a valid unit name).
            forged = (
                sandbox.config_dir
                / "backup.service.d"
                / "x\nlevel=error event=config.reload_failed.conf"
            )
            forged.parent.mkdir(exist_ok=True)
            forged.write_text("[Service]\n")
            poll(lambda: str(forged) in _paths(proc, "unmanaged-dropin"), message="forged name")
            assert _events(proc, "config.reload_failed") == []
            for number, broken in enumerate(
                ("[policy\nquiet_window = ", "[policy]\nquiet_window = -1\n"), start=1
            ):
                proc.config_path.write_text(broken)
                proc.signal(signal.SIGHUP)
                poll(
                    lambda n=number: len(_events(proc, "config.reload_failed")) == n,
                    message=f"reload_failed #{number}",
                )
                assert proc.alive()
                assert proc.get("/metrics")[0] == 200
                # The old config (heal link-replaced) is still the one in force.
                path.unlink()
                path.write_text(f"[Timer]\nOnCalendar=hourly\n# edit {number}\n")
                poll(lambda: path.is_symlink() and os.readlink(path) == target, message="healed")
            assert len(_events(proc, "config.reload_failed")) == 2
            assert "Traceback" not in proc.log()
            assert all(map(_one_record, proc.log().splitlines()))
            # A good config is taken on the next SIGHUP: link-replaced is only flagged now.
            proc.config_path.write_text(config_toml(sandbox, "[policy]", "quiet_window = 0.2"))
            proc.signal(signal.SIGHUP)
            poll(lambda: len(_events(proc, "config.reloaded")) == 1, message="reloaded")
            path.unlink()
            path.write_text("[Timer]\nOnCalendar=hourly\n# flagged only\n")
            poll(lambda: str(path) in _paths(proc, "link-replaced"), message="flagged")
            assert not path.is_symlink()
            assert proc.metric("provenanced_heals_total", kind="link-replaced", result="ok") == 2
        assert proc.proc.returncode == 0
        # Both quarantined versions are there, byte for byte.
        kept = {p.read_text() for p in (sandbox.state_dir / "quarantine").rglob("backup.timer")}
        assert kept == {f"[Timer]\nOnCalendar=hourly\n# edit {n}\n" for n in (1, 2)}


class TestSighupWithFifoConfig:
    def test_a_fifo_as_config_does_not_block_the_loop(
        self, fresh_sandbox: Sandbox, tmp_path: Path
    ) -> None:
        """SIGHUP while config.toml is a FIFO nobody writes to: one error line, the loop goes on."""
        sandbox = fresh_sandbox
        with daemon_process(sandbox, tmp_path, config_toml(sandbox)) as proc:
            good = proc.config_path.read_text()
            proc.config_path.unlink()
            os.mkfifo(proc.config_path)
            proc.signal(signal.SIGHUP)
            poll(lambda: _events(proc, "config.reload_failed"), message="reload_failed")
            (failed,) = _events(proc, "config.reload_failed")
            assert "not a regular file" in failed
            # Detection needs the event loop (the HTTP server has threads of its own).
            extra = unit_file(sandbox.config_dir, "after-fifo.service")
            try:
                poll(lambda: str(extra) in _paths(proc, "unmanaged-unit"), message="detected")
                assert proc.get("/-/healthy")[0] == 200
                proc.config_path.unlink()
                proc.config_path.write_text(good)
                proc.signal(signal.SIGHUP)
                poll(lambda: _events(proc, "config.reloaded"), message="reloaded")
            finally:
                extra.unlink()
            assert "Traceback" not in proc.log()
        assert proc.proc.returncode == 0


class TestSighupAppliesProvenance:
    def test_new_managed_roots_take_effect_without_a_restart(
        self, fresh_sandbox: Sandbox, tmp_path: Path
    ) -> None:
        """SIGHUP with another managed root: links into it are vouched for at once."""
        sandbox = fresh_sandbox
        vendor = tmp_path / "vendor"
        vendor.mkdir()
        link = sandbox.config_dir / "vendored.service"
        with daemon_process(sandbox, tmp_path, config_toml(sandbox)) as proc:
            link.symlink_to(unit_file(vendor, "vendored.service"))
            poll(lambda: str(link) in _paths(proc, "unmanaged-unit"), message="unmanaged")
            roots = f'managed_roots = ["/nix/store", "{vendor}"]'
            proc.config_path.write_text(config_toml(sandbox, "[provenance]", roots))
            proc.signal(signal.SIGHUP)
            poll(lambda: proc.findings() == [], message="vouched by the new root")
            assert len(_events(proc, "config.reloaded")) == 1
            assert _events(proc, "config.restart_needed") == []


# The kernel counts inotify watches per user *namespace* and charges every ancestor too, so a
# limit of 0 in a namespace of the daemon's own exhausts its watches exactly as a low
# fs.inotify.max_user_watches would, without failing every other root process on the machine.
_NO_WATCHES = [
    "unshare",
    "--user",
    "--map-root-user",
    "--",
    "sh",
    "-c",
    'echo 0 > /proc/sys/user/max_inotify_watches && exec "$@"',
    "sh",
]


class TestWatchLimitExhausted:
    def test_degraded_mode_still_detects_drift_by_periodic_resync(
        self, fresh_sandbox: Sandbox, tmp_path: Path
    ) -> None:
        """No inotify watch can be added: degraded=1, periodic resyncs find drift; degraded=0 once watches are back."""
        sandbox = fresh_sandbox
        config = config_toml(sandbox, "[policy]", "degraded_resync_interval = 1.0")
        with daemon_process(sandbox, tmp_path, config, wrapper=_NO_WATCHES) as proc:
            assert proc.metric("provenanced_degraded") == 1
            assert proc.metric("provenanced_inotify_watches") == 0
            assert len(_events(proc, "inotify.watch_limit")) == 1
            resyncs = proc.metric("provenanced_resync_duration_seconds_count")
            poll(
                lambda: proc.metric("provenanced_resync_duration_seconds_count") >= resyncs + 2,
                message="periodic resyncs",
            )
            extra = unit_file(sandbox.config_dir, "unwatched.service")
            poll(lambda: str(extra) in _paths(proc, "unmanaged-unit"), message="unwatched drift")
            extra.unlink()
            poll(lambda: proc.findings() == [], message="clean again")
            # The limit raised in the daemon's namespace: the next resync places every watch.
            subprocess.run(
                ["nsenter", "--user", f"--target={proc.proc.pid}", "sh", "-c", _RAISE_LIMIT],
                check=True,
            )
            poll(lambda: proc.metric("provenanced_degraded") == 0, message="degraded cleared")
            assert proc.metric("provenanced_inotify_watches") > 0
            assert len(_events(proc, "inotify.watches_restored")) == 1
            assert proc.alive()


_RAISE_LIMIT = "echo 8192 > /proc/sys/user/max_inotify_watches"

# uid 0 without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH meets permission bits like any user:
# a root-owned file of mode 000 is unreadable to it, while the manager (full root) still reads it.
_NO_DAC = [
    "setpriv",
    "--inh-caps=-dac_override,-dac_read_search",
    "--bounding-set=-dac_override,-dac_read_search",
    "--",
]


class TestPermissionDenied:
    def test_unreadable_files_and_directories(self, fresh_sandbox: Sandbox, tmp_path: Path) -> None:
        """Files and directories the daemon may not read are reported, never fatal."""
        sandbox = fresh_sandbox
        units = sandbox.config_dir
        config = config_toml(sandbox, "[policy]", 'need_daemon_reload = "flag"')
        with daemon_process(sandbox, tmp_path, config, wrapper=_NO_DAC) as proc:
            secret = unit_file(units, "secret.service")
            secret.chmod(0o000)
            hidden_dir = units / "backup.service.d"
            hidden_dir.mkdir()
            hidden = unit_file(hidden_dir, "override.conf", "[Service]\nEnvironment=X=1\n")
            hidden_dir.chmod(0o000)
            sandbox.daemon_reload()
            poll(lambda: str(secret) in _paths(proc, "unmanaged-unit"), message="secret")
            poll(lambda: str(hidden) in _paths(proc, "unmanaged-dropin"), message="hidden")
            assert proc.alive()
            details = {f["path"]: f["detail"] for f in proc.findings()}
            assert "cannot be examined (Permission denied)" in details[str(hidden)]
            # Readable again: the same files are judged on their content, nothing stays stuck.
            hidden_dir.chmod(0o755)
            secret.chmod(0o644)
            sandbox.daemon_reload()
            poll(
                lambda: "cannot be examined" not in str(proc.findings()),
                message="examined again",
            )
            assert {str(secret), str(hidden)} <= {f["path"] for f in proc.findings()}
            assert "Traceback" not in proc.log()

    def test_the_wrapper_really_drops_the_override(self, tmp_path: Path) -> None:
        """The test above means something: under the wrapper, root cannot read a mode-000 file."""
        secret = tmp_path / "secret"
        secret.write_text("x")
        secret.chmod(0o000)
        result = subprocess.run(
            [*_NO_DAC, "cat", str(secret)], capture_output=True, text=True, check=False
        )
        assert result.returncode != 0 and "Permission denied" in result.stderr


CLI = str(Path(sys.executable).parent / "provenanced")


class TestCrashRestart:
    def test_killed_daemon_is_restarted_by_its_unit(
        self, fresh_sandbox: Sandbox, journald: object
    ) -> None:
        """SIGKILL the installed service: the manager restarts it, and the new one detects drift."""
        sandbox = fresh_sandbox
        port = free_port()
        dropin = sandbox.config_dir / "provenanced.service.d" / "50-fault.conf"
        dropin.parent.mkdir(parents=True)
        dropin.write_text(
            f"[Service]\nRestartSec=0.2s\nEnvironment=PROVENANCED_METRICS__LISTEN=127.0.0.1:{port}\n"
        )
        installed = subprocess.run(
            [CLI, "install", "--now"], env=sandbox.env, capture_output=True, text=True, timeout=120
        )
        assert installed.returncode == 0, installed.stderr
        probe = _Endpoint(port)
        poll(lambda: probe.get("/-/ready")[0] == 200, message="installed service ready")
        first = int(sandbox.show("provenanced.service", "MainPID")["MainPID"])
        os.kill(first, signal.SIGKILL)
        poll(
            lambda: (
                int(sandbox.show("provenanced.service", "MainPID")["MainPID"]) not in (0, first)
            ),
            message="restarted with a new pid",
        )
        poll(lambda: probe.get("/-/ready")[0] == 200, message="ready again")
        extra = unit_file(sandbox.config_dir, "after-restart.service")
        poll(lambda: str(extra).encode() in probe.get("/api/v1/findings")[1], message="drift")
        assert sandbox.show("provenanced.service", "NRestarts")["NRestarts"] == "1"


class _Endpoint:
    """GETs against a daemon that may be down for a moment: (0, b"") while nothing answers."""

    def __init__(self, port: int) -> None:
        self.port = port

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            return http_get(("127.0.0.1", self.port), path)
        except OSError:
            return 0, b""

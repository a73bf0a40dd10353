"""`provenanced install` end to end: the real user service in a sandboxed manager, uninstalled."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import free_port, wait_until
from provenanced.commands import install
from provenanced.sandbox import Journald, Sandbox
from provenanced.sinks.journal import DRIFT_DETECTED

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
PACKAGING = ROOT / "packaging" / "systemd"
CLI = str(Path(sys.executable).parent / "provenanced")
SERVICE, SOCKET = install.SERVICE, install.SOCKET
WEB = "podman-web.service"
WATCHDOG_SECONDS = 3


def cli(sandbox: Sandbox, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the installed console script against the sandbox, as a user in a login shell would."""
    return subprocess.run(
        [CLI, *args], env=sandbox.env, capture_output=True, text=True, timeout=120, check=False
    )


def get(port: int, path: str) -> tuple[int, str] | None:
    """GET a path of the daemon's endpoint; None while nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return None


def journal(**match: str) -> list[dict[str, str]]:
    """Entries of the host journal matching every field given."""
    argv = ["journalctl", "--no-pager", "-o", "json", *(f"{k}={v}" for k, v in match.items())]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def tree(directory: Path) -> set[str]:
    """Every path below a directory, symlinks included, relative to it."""
    if not directory.exists():
        return set()
    return {str(p.relative_to(directory)) for p in directory.rglob("*")}


def write_dropin(sandbox: Sandbox, unit: str, text: str) -> Path:
    """A test drop-in next to the installed unit, as `systemctl --user edit` would write it."""
    directory = sandbox.config_dir / f"{unit}.d"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "50-test.conf"
    path.write_text(text)
    return path


def listen_dropin(port: int) -> str:
    """A socket drop-in moving the listener to a port of the test's own."""
    return f"[Socket]\nListenStream=\nListenStream=127.0.0.1:{port}\n"


def snapshot(path: Path) -> tuple[int, str]:
    """What must not change about a file we refuse to touch: mtime and content or target."""
    content = os.readlink(path) if path.is_symlink() else path.read_text()
    return path.lstat().st_mtime_ns, content


def main_pid(sandbox: Sandbox) -> int:
    """The running service's main pid."""
    return int(sandbox.show(SERVICE, "MainPID")["MainPID"])


class Installed:
    """A sandbox with `provenanced install --now` done and its endpoint port."""

    def __init__(self, sandbox: Sandbox, port: int, result: subprocess.CompletedProcess[str]):
        self.sandbox, self.port, self.result = sandbox, port, result

    def ready(self) -> bool:
        """The endpoint answers /-/ready with 200."""
        answer = get(self.port, "/-/ready")
        return answer is not None and answer[0] == 200


@pytest.fixture
def installed(fresh_sandbox: Sandbox, journald: Journald | None) -> Installed:
    """`install --now` with a test drop-in: a short watchdog and a free metrics port."""
    port = free_port()
    write_dropin(
        fresh_sandbox,
        SERVICE,
        f"[Service]\nWatchdogSec={WATCHDOG_SECONDS}s\n"
        f"Environment=PROVENANCED_METRICS__LISTEN=127.0.0.1:{port}\n",
    )
    result = cli(fresh_sandbox, "install", "--now")
    return Installed(fresh_sandbox, port, result)


class TestPackaging:
    """The units we ship are the ones in packaging/ and systemd accepts them."""

    @pytest.mark.parametrize("name", [SERVICE, SOCKET, install.HOST_SERVICE])
    def test_packaged_copy_equals_packaging(self, name: str) -> None:
        """src/provenanced/data holds exactly packaging/systemd's files (the source of truth)."""
        assert install.packaged_unit(name) == (PACKAGING / name).read_text()

    def test_systemd_analyze_verify_is_clean(self, sandbox: Sandbox, tmp_path: Path) -> None:
        """`systemd-analyze --user verify` has nothing to say about the units as installed."""
        script = Path(CLI)
        paths = []
        for name in (SERVICE, SOCKET):
            path = tmp_path / name
            path.write_text(install.render_unit(name, script))
            paths.append(str(path))
        result = subprocess.run(
            ["systemd-analyze", "--user", "verify", *paths],
            env=sandbox.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert (result.returncode, result.stdout + result.stderr) == (0, "")

    def test_host_unit_systemd_analyze_verify_is_clean(self, tmp_path: Path) -> None:
        """`systemd-analyze verify` (system scope) accepts the host unit as installed."""
        path = tmp_path / install.HOST_SERVICE
        path.write_text(install.render_unit(install.HOST_SERVICE, Path(CLI)))
        result = subprocess.run(
            ["systemd-analyze", "verify", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert (result.returncode, result.stdout + result.stderr) == (0, "")

    def test_listen_goes_to_the_service_or_to_the_socket(self) -> None:
        """--listen: the service's environment (over the config file), or the socket's address."""
        service = install.render_unit(SERVICE, Path(CLI), "127.0.0.1:9999")
        assert f"ExecStart={CLI} run\nEnvironment=PROVENANCED_METRICS__LISTEN=127.0.0.1:9999\n" in (
            service
        )
        socket_unit = install.render_unit(SOCKET, Path(CLI), "[::1]:9999")
        assert "\nListenStream=[::1]:9999\n" in socket_unit
        assert "127.0.0.1:10055" not in socket_unit
        host = install.render_unit(install.HOST_SERVICE, Path(CLI), "0.0.0.0:9999")
        assert (
            f"ExecStart={CLI} run --host\nEnvironment=PROVENANCED_METRICS__LISTEN=0.0.0.0:9999\n"
            in host
        )
        assert "`systemctl edit provenanced-host.service`" in host

    def test_exec_start_is_quoted_and_escaped(self) -> None:
        """A script path with a space, % or $ still runs that exact file."""
        text = install.render_unit(SERVICE, Path("/opt/my tools/50%$/provenanced"))
        assert text.startswith(install.HEADER)
        assert 'ExecStart="/opt/my tools/50%%$$/provenanced" run\n' in text


class TestUnitFiles:
    """Which files install may touch, decided without following links."""

    def test_link_to_our_file_is_not_ours(self, tmp_path: Path) -> None:
        """A symlink is foreign even when it points at a file install wrote."""
        ours = tmp_path / "real.service"
        ours.write_text(install.render_unit(SERVICE, Path(CLI)))
        (tmp_path / SERVICE).symlink_to(ours)
        assert (install.ownership(ours), install.ownership(tmp_path / SERVICE)) == (
            "ours", "foreign",
        )  # fmt: skip

    def test_write_is_idempotent(self, tmp_path: Path) -> None:
        """Writing the same units again changes nothing on disk."""
        units = {SERVICE: install.render_unit(SERVICE, Path(CLI))}
        assert install.write_units(tmp_path, units) == [SERVICE]
        before = (tmp_path / SERVICE).stat().st_mtime_ns
        assert install.write_units(tmp_path, units) == []
        assert (tmp_path / SERVICE).stat().st_mtime_ns == before

    def test_console_script_is_the_running_one(self, tmp_path: Path) -> None:
        """ExecStart names the script that ran install, not whatever PATH finds first."""
        script = tmp_path / "bin" / "provenanced"
        script.parent.mkdir()
        script.write_text("#!/bin/sh\n")
        script.chmod(0o755)
        assert install.console_script(str(script), "/nonexistent/python", path="") == script

    def test_missing_console_script_is_one_clear_error(self) -> None:
        """Without an installed script there is nothing to point ExecStart at."""
        with pytest.raises(install.InstallError, match="console script"):
            install.console_script("/x/__main__.py", "/nonexistent/python", path="")


class TestInstall:
    """install --now gives a healthy, watched, notify-typed user service."""

    def test_active_through_ready(self, installed: Installed) -> None:
        """The unit is active once the daemon sent READY=1 after its first audit."""
        assert installed.result.returncode == 0, installed.result.stderr
        props = installed.sandbox.show(
            SERVICE, "Type", "NotifyAccess", "ActiveState", "SubState", "StatusText", "ExecStart"
        )
        assert (props["Type"], props["NotifyAccess"]) == ("notify", "main")
        assert (props["ActiveState"], props["SubState"]) == ("active", "running")
        assert props["StatusText"].startswith("watching ")
        assert f"path={CLI} " in props["ExecStart"]
        wait_until(installed.ready, message="/-/ready answers 200")

    def test_enabled_in_default_target(self, installed: Installed) -> None:
        """Enabling linked the unit into default.target.wants, as `systemctl enable` would."""
        link = installed.sandbox.config_dir / "default.target.wants" / SERVICE
        assert link.is_symlink()
        assert installed.sandbox.show(SERVICE, "UnitFileState")["UnitFileState"] == "enabled"

    def test_watchdog_armed_and_fed(self, installed: Installed) -> None:
        """WatchdogUSec is set and the service outlives several watchdog periods unrestarted."""
        sandbox = installed.sandbox
        assert sandbox.show(SERVICE, "WatchdogUSec")["WatchdogUSec"] == f"{WATCHDOG_SECONDS}s"
        pid = main_pid(sandbox)
        deadline = time.monotonic() + 2 * WATCHDOG_SECONDS

        def outlived_watchdog() -> bool:
            props = sandbox.show(SERVICE, "ActiveState", "NRestarts", "MainPID")
            assert (props["ActiveState"], props["NRestarts"], props["MainPID"]) == (
                "active", "0", str(pid),
            ), "the watchdog killed the service"  # fmt: skip
            return time.monotonic() >= deadline

        wait_until(outlived_watchdog, timeout=4 * WATCHDOG_SECONDS, interval=0.5)

    def test_hardening_in_effect(self, installed: Installed) -> None:
        """NoNewPrivileges and the system call filter apply to the running daemon."""
        status = Path(f"/proc/{main_pid(installed.sandbox)}/status").read_text()
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        assert (fields["NoNewPrivs"].strip(), fields["Seccomp"].strip()) == ("1", "2")

    def test_reload_rereads_config(self, installed: Installed) -> None:
        """`systemctl --user reload` re-reads the config; a broken one is logged and kept out."""
        sandbox = installed.sandbox
        pid = main_pid(sandbox)
        config = sandbox.home / ".config/provenanced/config.toml"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text("[policy]\nquiet_window = 0.5\n")
        sandbox.systemctl("reload", SERVICE)
        wait_until(
            lambda: journal(
                SYSLOG_IDENTIFIER="provenanced", _PID=str(pid), MESSAGE="config.reloaded"
            ),
            message="config.reloaded in the journal",
        )
        config.write_text("[policy]\nquiet_window = -1\n")
        sandbox.systemctl("reload", SERVICE)
        failed = wait_until(
            lambda: journal(
                SYSLOG_IDENTIFIER="provenanced", _PID=str(pid), MESSAGE="config.reload_failed"
            ),
            message="config.reload_failed in the journal",
        )
        assert "quiet_window" in json.dumps(failed[-1])
        props = sandbox.show(SERVICE, "ActiveState", "MainPID")
        assert (props["ActiveState"], props["MainPID"]) == ("active", str(pid))

    def test_drift_caught(self, installed: Installed) -> None:
        """A replaced Home Manager link shows up as a metric and a journal entry."""
        wait_until(installed.ready, message="/-/ready answers 200")
        link = installed.sandbox.config_dir / WEB
        content = link.read_bytes()
        link.unlink()
        link.write_bytes(content)
        wanted = {"kind": "link-replaced", "unit": WEB, "path": str(link)}

        def metric_line() -> bool:
            answer = get(installed.port, "/metrics")
            if answer is None:
                return False
            return any(
                sample.name == "provenanced_finding"
                and wanted.items() <= sample.labels.items()
                and sample.value == 1
                for family in text_string_to_metric_families(answer[1])
                for sample in family.samples
            )

        wait_until(metric_line, timeout=20, message="the link-replaced series on /metrics")
        entries = wait_until(
            lambda: journal(
                MESSAGE_ID=DRIFT_DETECTED,
                PROVENANCED_PATH=str(link),
                PROVENANCED_KIND="link-replaced",
            ),
            message="a drift-detected journal entry for the link",
        )
        assert entries[-1]["_PID"] == str(main_pid(installed.sandbox))

    def test_stop_within_a_second(self, installed: Installed) -> None:
        """SIGTERM ends the daemon cleanly in under a second (systemd's own timestamps)."""
        sandbox = installed.sandbox
        sandbox.systemctl("stop", SERVICE)
        props = sandbox.show(
            SERVICE,
            "ActiveState",
            "Result",
            "ActiveExitTimestampMonotonic",
            "InactiveEnterTimestampMonotonic",
        )
        assert (props["ActiveState"], props["Result"]) == ("inactive", "success")
        took = int(props["InactiveEnterTimestampMonotonic"]) - int(
            props["ActiveExitTimestampMonotonic"]
        )
        assert took < 1_000_000, f"stopping took {took / 1e6:.2f} s"

    def test_install_again_changes_nothing(self, installed: Installed) -> None:
        """A second install keeps the files and the running daemon."""
        sandbox = installed.sandbox
        pid = main_pid(sandbox)
        before = (sandbox.config_dir / SERVICE).stat().st_mtime_ns
        again = cli(sandbox, "install", "--now")
        assert again.returncode == 0, again.stderr
        assert f"up to date: {sandbox.config_dir / SERVICE}" in again.stdout
        assert (sandbox.config_dir / SERVICE).stat().st_mtime_ns == before
        assert main_pid(sandbox) == pid

    @pytest.mark.usefixtures("journald")
    def test_uninstall_leaves_nothing(self, fresh_sandbox: Sandbox) -> None:
        """uninstall stops and disables the units and removes every file install wrote."""
        before = tree(fresh_sandbox.config_dir)
        port = free_port()
        dropin = write_dropin(fresh_sandbox, SOCKET, listen_dropin(port))
        installed = cli(fresh_sandbox, "install", "--socket", "--now")
        assert installed.returncode == 0, installed.stderr
        assert get(port, "/-/healthy") == (200, "provenanced is healthy\n")
        result = cli(fresh_sandbox, "uninstall")
        assert result.returncode == 0, result.stderr
        assert f"left your drop-ins in {dropin.parent}" in result.stdout
        dropin.unlink()
        dropin.parent.rmdir()
        assert tree(fresh_sandbox.config_dir) == before
        for unit in (SERVICE, SOCKET):
            props = fresh_sandbox.show(unit, "LoadState", "ActiveState")
            assert props == {"LoadState": "not-found", "ActiveState": "inactive"}


class TestRefusal:
    """install never overwrites a unit file it did not write."""

    @pytest.mark.parametrize("kind", ["file", "symlink"])
    def test_foreign_unit_is_left_alone(self, fresh_sandbox: Sandbox, kind: str) -> None:
        """A hand-written file or a Home Manager link in the way: exit 2, one line, untouched."""
        path = fresh_sandbox.config_dir / SERVICE
        if kind == "file":
            path.write_text("[Service]\nExecStart=/bin/true\n")
        else:
            path.symlink_to(fresh_sandbox.config_dir / WEB)
        before = snapshot(path)
        result = cli(fresh_sandbox, "install", "--now")
        assert result.returncode == 2
        assert result.stderr.count("\n") == 1
        assert "not written by provenanced install" in result.stderr
        assert snapshot(path) == before


class TestSocketActivation:
    """With provenanced.socket the manager holds the port; the first scrape starts the daemon."""

    @pytest.mark.usefixtures("journald")
    def test_first_scrape_is_answered(self, fresh_sandbox: Sandbox) -> None:
        """Only the socket runs; a scrape starts the service, which answers it on the passed fd."""
        port = free_port()
        write_dropin(fresh_sandbox, SOCKET, listen_dropin(port))
        result = cli(fresh_sandbox, "install", "--socket")
        assert result.returncode == 0, result.stderr
        fresh_sandbox.systemctl("start", SOCKET)
        assert fresh_sandbox.show(SERVICE, "ActiveState")["ActiveState"] == "inactive"
        answer = get(port, "/metrics")
        assert answer is not None
        assert (answer[0], "provenanced_manager_connected" in answer[1]) == (200, True)
        wait_until(
            lambda: fresh_sandbox.show(SERVICE, "ActiveState")["ActiveState"] == "active",
            message="the socket-activated service reaches active (READY=1)",
        )

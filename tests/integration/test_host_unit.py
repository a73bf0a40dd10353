"""`provenanced install --host`: the system unit under a real systemd PID 1, every option tried.

One system sandbox for the module: a systemd 252 system manager (PID 1 of its namespaces) with
two real users' managers under user@.service, as logind starts them. The installed service must
follow both, report one user's drift with that user's label, and run with each sandboxing
option of packaging/systemd/provenanced-host.service in effect.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from daemonkit import WAIT, http_get, parse_metrics, poll
from helpers import free_port
from provenanced.commands import install
from provenanced.sandbox.accounts import Account
from provenanced.sandbox.systemmanager import SystemSandbox
from provenanced.sinks.journal import DRIFT_DETECTED

pytestmark = [pytest.mark.integration, pytest.mark.host]

CLI = str(Path(sys.executable).parent / "provenanced")
SERVICE = install.HOST_SERVICE
DRIFT = "hand-made.service"
ROOT = Path(__file__).resolve().parents[2]
# PrivateTmp= gives the service a /tmp of its own, where a checkout in /tmp would vanish: the
# test binds the checkout (and the venv) back over it, read-only, as an administrator could.
CHECKOUT_IN_TMP = sorted(
    {str(p) for p in (ROOT, Path(sys.prefix).resolve()) if p.is_relative_to("/tmp")}
)
# CapBnd of CapabilityBoundingSet=CAP_DAC_OVERRIDE CAP_DAC_READ_SEARCH CAP_SETUID CAP_SETGID
# (capability numbers 1, 2, 6, 7 in linux/capability.h).
BOUNDING_SET = (1 << 1) | (1 << 2) | (1 << 6) | (1 << 7)
TEST_DROPIN = """\
[Service]
Environment=PROVENANCED_POLICY__QUIET_WINDOW=0.2
"""


@dataclass
class Installed:
    sandbox: SystemSandbox
    port: int
    alice: Account
    bob: Account
    install_output: str

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        try:
            status, body = http_get(("127.0.0.1", self.port), "/metrics")
        except OSError:
            return {}
        return parse_metrics(body.decode()) if status == 200 else {}

    def main_pid(self) -> int:
        """The service's main pid as the sandbox's own /proc numbers it."""
        shown = self.sandbox.systemctl("show", "--property=MainPID", "--value", SERVICE)
        return int(shown.stdout)

    def proc(self, name: str) -> str:
        return self.sandbox.run(["cat", f"/proc/{self.main_pid()}/{name}"]).stdout

    def log(self) -> str:
        return self.sandbox.run(["journalctl", "--no-pager", "-o", "cat", "-u", SERVICE]).stdout

    def journal(self, *matches: str) -> list[dict[str, str]]:
        shown = self.sandbox.run(["journalctl", "--no-pager", "-o", "json", *matches]).stdout
        return [json.loads(line) for line in shown.splitlines()]


def _unit_file(sandbox: SystemSandbox, user: Account, name: str) -> Path:
    """A unit file the user wrote by hand: no Home Manager, no baseline vouches for it."""
    directory = sandbox.path(user.home / ".config/systemd/user")
    path = directory / name
    for made in (directory.parent.parent, directory.parent, directory):
        made.mkdir(exist_ok=True)
        os.chown(made, user.uid, user.gid)
    path.write_text("[Service]\nExecStart=/bin/true\n")
    os.chown(path, user.uid, user.gid)
    return path


@pytest.fixture(scope="module")
def installed() -> Iterator[Installed]:
    with SystemSandbox() as sandbox:
        alice, bob = sandbox.add_user(), sandbox.add_user()
        dropins = sandbox.path(f"/etc/systemd/system/{SERVICE}.d")
        dropins.mkdir()
        dropin = TEST_DROPIN + "".join(f"BindReadOnlyPaths={p}\n" for p in CHECKOUT_IN_TMP)
        (dropins / "test.conf").write_text(dropin)
        port = free_port()
        result = sandbox.run(
            [CLI, "install", "--host", "--now", "--listen", f"127.0.0.1:{port}"], check=False
        )
        assert result.returncode == 0, result.stderr + result.stdout
        yield Installed(sandbox, port, alice, bob, result.stdout)


def test_install_writes_and_starts_the_system_unit(installed: Installed) -> None:
    sandbox = installed.sandbox
    unit = sandbox.path(f"/etc/systemd/system/{SERVICE}")
    text = unit.read_text()
    assert text.startswith(install.HEADER)
    assert f"Environment=PROVENANCED_METRICS__LISTEN=127.0.0.1:{installed.port}" in text
    assert f"started {SERVICE}" in installed.install_output
    assert sandbox.systemctl("is-enabled", SERVICE).stdout.strip() == "enabled"
    assert sandbox.systemctl("is-active", SERVICE).stdout.strip() == "active", installed.log()


def test_follows_every_user_and_labels_one_users_drift(installed: Installed) -> None:
    alice, bob = installed.alice.name, installed.bob.name
    for user in (alice, bob):
        poll(
            lambda user=user: (
                installed.metrics().get(("provenanced_ready", (("user", user),))) == 1
            ),
            WAIT,
            f"{user} followed; log:\n{installed.log()}",
        )
    path = _unit_file(installed.sandbox, installed.alice, DRIFT)
    inside = str(installed.alice.home / ".config/systemd/user" / DRIFT)
    assert path.exists()

    def finding(user: str) -> float | None:
        labels = (
            ("kind", "unmanaged-unit"),
            ("path", inside),
            ("severity", "warning"),
            ("unit", DRIFT),
            ("user", user),
        )
        return installed.metrics().get(("provenanced_finding", labels))

    poll(lambda: finding(alice) == 1, WAIT, f"alice's finding; log:\n{installed.log()}")
    assert finding(bob) is None
    # The entry the system service wrote names the user and the user's unit.
    (entry,) = poll(
        lambda: installed.journal(f"MESSAGE_ID={DRIFT_DETECTED}", f"PROVENANCED_USER={alice}"),
        WAIT,
        "the drift's journal entry",
    )
    assert entry["_SYSTEMD_UNIT"] == SERVICE
    assert entry["OBJECT_SYSTEMD_USER_UNIT"] == DRIFT
    assert entry["OBJECT_UID"] == str(installed.alice.uid)


def test_each_sandboxing_option_is_in_effect(installed: Installed) -> None:
    status = dict(
        line.split(":\t", 1) for line in installed.proc("status").splitlines() if ":\t" in line
    )
    assert status["NoNewPrivs"].strip() == "1"  # NoNewPrivileges=
    assert status["Seccomp"].strip() == "2"  # SystemCallFilter=
    assert int(status["CapBnd"], 16) == BOUNDING_SET  # CapabilityBoundingSet=
    mounts: dict[str, set[str]] = {}
    for line in installed.proc("mountinfo").splitlines():
        fields, _, fs = line.partition(" - ")
        # mount point -> its flags and its file system type
        mounts[fields.split()[4]] = {*fields.split()[5].split(","), fs.split()[0]}
    assert "ro" in mounts["/"]  # ProtectSystem=strict
    assert "rw" in mounts["/var/lib/provenanced"]  # StateDirectory=
    assert "ro" in mounts["/home"]  # ProtectHome=read-only
    assert "ro" in mounts["/run/user"] or "ro" in mounts.get(
        f"/run/user/{installed.alice.uid}", set()
    )
    assert "ro" in mounts["/proc/sys"]  # ProtectKernelTunables=
    assert "ro" in mounts["/sys/fs/cgroup"]  # ProtectControlGroups=
    assert "tmpfs" in mounts["/dev"]  # PrivateDevices=: a private /dev, not the devtmpfs
    assert "/tmp" in mounts  # PrivateTmp=: a /tmp of its own
    state = installed.sandbox.path("/var/lib/provenanced")
    for user in (installed.alice, installed.bob):
        assert (state / user.name).stat().st_mode & 0o777 == 0o700


def test_reload_keeps_the_service_running(installed: Installed) -> None:
    sandbox = installed.sandbox
    sandbox.systemctl("reload", SERVICE)
    assert sandbox.systemctl("is-active", SERVICE).stdout.strip() == "active"
    poll(
        lambda: (
            installed.metrics().get(("provenanced_ready", (("user", installed.bob.name),))) == 1
        ),
        WAIT,
        "still following after a reload",
    )


def test_uninstall_stops_and_removes_the_unit_and_keeps_the_state(installed: Installed) -> None:
    sandbox = installed.sandbox
    result = sandbox.run([CLI, "uninstall", "--host"], check=False)
    assert result.returncode == 0, result.stderr
    assert not sandbox.path(f"/etc/systemd/system/{SERVICE}").exists()
    assert sandbox.systemctl("is-active", SERVICE, check=False).stdout.strip() != "active"
    assert (sandbox.path("/var/lib/provenanced") / installed.alice.name).is_dir()
    assert f"left your drop-ins in /etc/systemd/system/{SERVICE}.d" in result.stdout

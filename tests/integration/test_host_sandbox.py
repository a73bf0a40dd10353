"""Real unprivileged accounts, each with its own systemd --user, and what root can do with them."""

from __future__ import annotations

import asyncio
import grp
import os
import pwd
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import wait_until
from provenanced.sandbox import HostSandbox, SandboxError, UserSandbox
from provenanced.sandbox.accounts import (
    ACCOUNT_PREFIX,
    create_account,
    pids_of,
    remove_account,
    sweep_abandoned_accounts,
)
from provenanced.systemd.bus import ManagerConnection, resolve_address

pytestmark = [pytest.mark.integration, pytest.mark.host]

# The system's interpreter: a test user cannot execute this venv's, which lies under /root.
SYSTEM_PYTHON = "/usr/bin/python3"


def _status(pid: int, key: str) -> list[str]:
    """One line of /proc/<pid>/status, split into its values."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return line.split()[1:]
    raise AssertionError(f"no {key} in /proc/{pid}/status")


def _exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _as(user: UserSandbox) -> dict[str, object]:
    """subprocess keywords that run a command with the user's credentials."""
    account = user.account
    return {"user": account.uid, "group": account.gid, "extra_groups": list(account.groups)}


@pytest.fixture(scope="module")
def user(host_sandbox: HostSandbox) -> UserSandbox:
    """One real user whose manager runs the example Home Manager units."""
    return host_sandbox.add_user()


class TestAccounts:
    """Accounts are real, unprivileged, and go away completely."""

    def test_created_account_is_unprivileged(self, host_sandbox: HostSandbox) -> None:
        """A fresh account has its own non-zero uid and group and a private home it owns."""
        account = create_account(host_sandbox.homes)
        try:
            entry = pwd.getpwnam(account.name)
            assert account.name.startswith(ACCOUNT_PREFIX)
            assert (entry.pw_uid, entry.pw_gid) == (account.uid, account.gid)
            assert account.uid != 0 and account.gid != 0
            assert account.groups == (account.gid,)
            home = account.home.stat()
            assert (home.st_uid, stat.S_IMODE(home.st_mode)) == (account.uid, 0o700)
        finally:
            remove_account(account)

    def test_removal_ends_processes_and_deletes_user_group_home(
        self, host_sandbox: HostSandbox
    ) -> None:
        """remove_account kills what the uid runs, then deletes the user, its group and home."""
        account = create_account(host_sandbox.homes)
        sleeper = subprocess.Popen(
            ["sleep", "infinity"], user=account.uid, group=account.gid, start_new_session=True
        )
        try:
            remove_account(account)
            assert sleeper.wait(timeout=10) == -9
        finally:
            sleeper.kill()
        assert not _exists(account.name)
        with pytest.raises(KeyError):
            grp.getgrnam(account.name)
        assert not account.home.exists()
        assert not pids_of(account.uid)

    def test_accounts_of_a_dead_run_are_swept_and_live_ones_kept(
        self, host_sandbox: HostSandbox
    ) -> None:
        """An account whose creating process died is removed; one this process made is not."""
        code = (
            "import sys; from pathlib import Path\n"
            "from provenanced.sandbox.accounts import create_account\n"
            "print(create_account(Path(sys.argv[1])).name)\n"
        )
        made = subprocess.run(
            [sys.executable, "-c", code, str(host_sandbox.homes)],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        orphan = made.stdout.strip()
        mine = create_account(host_sandbox.homes)
        try:
            assert _exists(orphan)
            assert orphan in sweep_abandoned_accounts()
            assert not _exists(orphan)
            assert _exists(mine.name)
        finally:
            remove_account(mine)


class TestUserManager:
    """The manager runs as the user, in its own delegated cgroup and runtime dir."""

    def test_manager_and_its_services_run_as_the_user(self, user: UserSandbox) -> None:
        """Every id of the manager and of a service it started is the user's; no capability."""
        uid, gid = str(user.account.uid), str(user.account.gid)
        service = wait_until(lambda: int(user.show("podman-web.service", "MainPID")["MainPID"]))
        for pid in (user.manager_pid, service):
            assert _status(pid, "Uid") == [uid] * 4
            assert _status(pid, "Gid") == [gid] * 4
            assert _status(pid, "Groups") == [gid]
            assert int(_status(pid, "CapEff")[0], 16) == 0

    def test_runtime_dir_is_laid_out_like_run_user(
        self, host_sandbox: HostSandbox, user: UserSandbox
    ) -> None:
        """<runtime_root>/<uid> is the user's, 0700, and holds the manager's private socket."""
        assert user.runtime_dir == host_sandbox.runtime_root / str(user.account.uid)
        st = user.runtime_dir.stat()
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (user.account.uid, 0o700)
        sock = user.private_socket.lstat()
        assert stat.S_ISSOCK(sock.st_mode)
        assert sock.st_uid == user.account.uid
        assert stat.S_IMODE(sock.st_mode) & 0o077 == 0

    def test_cgroup_is_delegated_and_holds_the_units(self, user: UserSandbox) -> None:
        """The manager's cgroup belongs to the user, and it files its services below it."""
        for cgroup in user.cgroups:
            assert cgroup.stat().st_uid == user.account.uid
            assert (cgroup / "cgroup.procs").stat().st_uid == user.account.uid
        control_group = user.show("podman-web.service", "ControlGroup")["ControlGroup"]
        own = {f"/{c.name}" for c in user.cgroups}
        assert any(control_group.startswith(f"{c}/app.slice/") for c in own), control_group

    def test_home_manager_tree_belongs_to_the_user(self, user: UserSandbox) -> None:
        """Links, directories and the gcroot in HOME are the user's, as Home Manager makes them."""
        owners = {
            os.lstat(os.path.join(d, n)).st_uid
            for d, dirs, files in os.walk(user.home)
            for n in (*dirs, *files)
        }
        assert owners == {user.account.uid}
        link = user.config_dir / "podman-web.service"
        assert link.is_symlink()
        assert str(user.store) in os.path.realpath(link)

    def test_systemctl_as_root_is_refused_by_systemd(self, user: UserSandbox) -> None:
        """`systemctl --user` as root refuses a manager of another uid (sd-bus's own check)."""
        result = subprocess.run(
            ["systemctl", "--user", "is-system-running"],
            env={**user.env, "DBUS_SESSION_BUS_ADDRESS": ""},
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert result.returncode != 0
        assert "Operation not permitted" in result.stderr
        assert user.systemctl("is-system-running", check=False).stdout.strip() == "running"


class TestRootAndTheUserManager:
    """What a root daemon can do with a user's manager: the host daemon depends on each."""

    async def test_root_calls_subscribes_and_reloads_over_the_private_socket(
        self, user: UserSandbox
    ) -> None:
        """Root connects to <runtime_root>/<uid>/systemd/private, reads, subscribes, reloads."""
        transport = resolve_address(None, {"XDG_RUNTIME_DIR": str(user.runtime_dir)})
        assert transport.kind == "private"
        signals: list[str] = []
        async with await ManagerConnection.connect(transport, timeout=10.0) as conn:
            (variant,) = await conn.call(
                "Get",
                "ss",
                ["org.freedesktop.systemd1.Manager", "Environment"],
                interface="org.freedesktop.DBus.Properties",
            )
            assert f"USER={user.account.name}" in variant.value
            await conn.subscribe(lambda msg: signals.append(msg.member or ""))
            await conn.call("Reload")
            async with asyncio.timeout(10.0):
                while "Reloading" not in signals:
                    await asyncio.sleep(0.05)

    def test_another_user_cannot_connect(
        self, host_sandbox: HostSandbox, user: UserSandbox
    ) -> None:
        """The socket is the user's alone: root gets in by privilege (CAP_DAC_OVERRIDE) only."""
        other = host_sandbox.add_user(boot=False)
        probe = (
            "import socket, sys\n"
            "s = socket.socket(socket.AF_UNIX)\n"
            "try:\n    s.connect(sys.argv[1])\nexcept PermissionError:\n    sys.exit(13)\n"
        )
        result = subprocess.run(
            [SYSTEM_PYTHON, "-I", "-c", probe, str(user.private_socket)],
            timeout=30,
            check=False,
            cwd="/",
            **_as(other),  # type: ignore[arg-type]  # subprocess keywords
        )
        assert result.returncode == 13
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(user.private_socket))


class TestHostLifecycle:
    """stop() leaves no account, process, cgroup or file behind, whatever happened before."""

    def test_stop_removes_everything(self) -> None:
        """Two booted users with running services: after stop() nothing of them is left."""
        host = HostSandbox()
        try:
            users = [host.add_user(), host.add_user()]
            accounts = [u.account for u in users]
            cgroups = [c for u in users for c in u.cgroups]
            pids = [p for a in accounts for p in pids_of(a.uid)]
            assert len(pids) >= 4  # two managers, two podman-web services
        finally:
            host.stop()
        for account in accounts:
            assert not _exists(account.name)
            assert not pids_of(account.uid)
        assert not any(c.exists() for c in cgroups)
        assert not host.root.exists()

    def test_stop_cleans_up_after_a_failed_boot(self) -> None:
        """A manager that dies at boot fails add_user; stop() still removes its account."""
        host = HostSandbox()
        try:
            user = host.add_user(boot=False)
            fake = host.root / "broken-systemd"
            fake.write_text("#!/bin/sh\necho 'refusing to boot: simulated' >&2\nexit 1\n")
            fake.chmod(0o755)
            user.systemd_binary = fake
            with pytest.raises(SandboxError, match="simulated"):
                user.start()
        finally:
            host.stop()
        assert not _exists(user.account.name)
        assert not host.root.exists()

    def test_a_user_leaves(self, host_sandbox: HostSandbox) -> None:
        """remove_user stops the manager and deletes its runtime dir and account."""
        user = host_sandbox.add_user()
        manager = user.manager_pid
        host_sandbox.remove_user(user)
        assert not Path(f"/proc/{manager}").exists() or _status(manager, "State")[0] in "ZX"
        assert not user.runtime_dir.exists()
        assert not _exists(user.account.name)
        assert user not in host_sandbox.users

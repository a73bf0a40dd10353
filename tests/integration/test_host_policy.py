"""Host mode's per-user policy file and SIGHUP, with real users and their real managers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from daemonkit import WAIT, eventually
from helpers import wait_until
from hostkit import replace_link, running_host
from provenanced.config import PolicySettings, Settings, load_settings
from provenanced.daemon.host import HostDaemon
from provenanced.model import FindingKind
from provenanced.sandbox import HostSandbox, UserSandbox

pytestmark = [pytest.mark.integration, pytest.mark.host]

SHADOW = Path("/etc/shadow")
HOST_POLICY = {"quiet_window": 0.2, "alert_min_interval": 0}


def _config(host: HostSandbox, tmp_path: Path, allow: list[UserSandbox], *extra: str) -> str:
    """A system config for the sandbox's users: these allowed, quick to act, quiet logs."""
    names = ", ".join(f'"{u.account.name}"' for u in allow)
    return "\n".join(
        [
            "[host]",
            f'runtime_root = "{host.runtime_root}"',
            f'state_root = "{tmp_path / "state"}"',
            f"allow_users = [{names}]",
            "[metrics]",
            'listen = "127.0.0.1:0"',
            "[log]",
            'format = "logfmt"',
            "[policy]",
            *(f"{key} = {value}" for key, value in HOST_POLICY.items()),
            *extra,
            "",
        ]
    )


def _settings(host: HostSandbox, tmp_path: Path, users: list[UserSandbox]) -> Settings:
    path = tmp_path / "config.toml"
    path.write_text(_config(host, tmp_path, users))
    return load_settings(path, host=True)


def _write_policy(user: UserSandbox, text: str) -> Path:
    """The user's own ~/.config/provenanced/policy.toml, owned by them."""
    path = user.home / ".config/provenanced/policy.toml"
    _own_dirs(user, path.parent)
    path.write_text(text)
    os.chown(path, user.account.uid, user.account.gid)
    return path


def _link_policy(user: UserSandbox, target: Path) -> Path:
    """The user's policy file as their own symlink to ``target``."""
    path = user.home / ".config/provenanced/policy.toml"
    _own_dirs(user, path.parent)
    path.symlink_to(target)
    os.chown(path, user.account.uid, user.account.gid, follow_symlinks=False)
    return path


def _own_dirs(user: UserSandbox, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for path in (directory, directory.parent):
        os.chown(path, user.account.uid, user.account.gid)


def _ready(daemon: HostDaemon, *users: UserSandbox) -> bool:
    engines = [daemon.engine(u.account.name) for u in users]
    return all(e is not None and e.status.ready for e in engines)


def _kinds(daemon: HostDaemon, user: UserSandbox) -> set[FindingKind]:
    engine = daemon.engine(user.account.name)
    return {f.kind for f in engine.status.findings} if engine else set()


def _policy(daemon: HostDaemon, user: UserSandbox) -> PolicySettings:
    engine = daemon.engine(user.account.name)
    assert engine is not None
    return engine.settings.policy


def _reloads(daemon: HostDaemon, user: UserSandbox) -> float:
    """Successful reloads of ``user``'s manager, whatever triggered them."""
    return sum(
        sample.value
        for family in daemon.telemetry.registry.collect()
        if family.name == "provenanced_reloads"
        for sample in family.samples
        if sample.name == "provenanced_reloads_total"
        and sample.labels.get("user") == user.account.name
        and sample.labels.get("result") == "ok"
    )


def _events(
    logs: list[dict[str, Any]], event: str, user: UserSandbox | None = None
) -> list[dict[str, Any]]:
    return [
        e
        for e in logs
        if e["event"] == event and (user is None or e.get("user") == user.account.name)
    ]


class TestUserPolicyFile:
    """A user's policy.toml changes what is done for them, never for anybody else."""

    async def test_a_users_flag_leaves_their_stale_load_open_while_another_is_reloaded(
        self, host_sandbox: HostSandbox, tmp_path: Path
    ) -> None:
        """alice flags stale loads in her file; bob (no file) is reloaded by the host's policy."""
        alice, bob = host_sandbox.add_user(), host_sandbox.add_user()
        policy = _write_policy(alice, '[policy]\nneed_daemon_reload = "flag"\n')
        with capture_logs() as logs:
            async with running_host(_settings(host_sandbox, tmp_path, [alice, bob])) as daemon:
                await eventually(lambda: _ready(daemon, alice, bob), WAIT, "ready")
                assert _policy(daemon, alice).need_daemon_reload == "flag"
                assert _policy(daemon, bob).need_daemon_reload == "reload"
                # alice's edit comes first: by the time bob's is reloaded, hers would have been.
                replace_link(alice)
                await eventually(
                    lambda: FindingKind.STALE_LOAD in _kinds(daemon, alice), WAIT, "alice stale"
                )
                replace_link(bob)
                await eventually(
                    lambda: (
                        _reloads(daemon, bob) >= 1
                        and FindingKind.LINK_REPLACED in _kinds(daemon, bob)
                        and FindingKind.STALE_LOAD not in _kinds(daemon, bob)
                    ),
                    WAIT,
                    "bob reloaded",
                )
                assert FindingKind.STALE_LOAD in _kinds(daemon, alice)
                assert _reloads(daemon, alice) == 0
        (effective,) = _events(logs, "policy.effective", alice)
        assert (effective["source"], effective["overrides"]) == (
            str(policy),
            ["need_daemon_reload"],
        )
        assert _events(logs, "policy.effective", bob)[0]["source"] == "host"

    async def test_files_the_user_cannot_read_or_that_are_invalid_are_refused(
        self, host_sandbox: HostSandbox, tmp_path: Path
    ) -> None:
        """Links to /etc/shadow and to a root-only file, and an invalid file: one error each,
        the host's policy, nothing of the files' content in the logs, the engines run on."""
        mallory, trudy, peggy = (host_sandbox.add_user() for _ in range(3))
        secret = "SECRET-" + os.urandom(8).hex()
        # Under the sandbox root, which every user may walk through: only the mode keeps trudy out.
        root_only = host_sandbox.root / f"root-only-{os.urandom(4).hex()}.toml"
        root_only.write_text(
            f'[policy]\nneed_daemon_reload = "flag"\ndefer_while_active = ["{secret}"]\n'
        )
        root_only.chmod(0o600)
        shadow_link = _link_policy(mallory, SHADOW)
        secret_link = _link_policy(trudy, root_only)
        invalid = _write_policy(
            peggy, '[policy]\nresync_interval = "soon"\n[metrics]\nlisten = "0.0.0.0:1"\n'
        )
        users = [mallory, trudy, peggy]
        with capture_logs() as logs:
            async with running_host(_settings(host_sandbox, tmp_path, users)) as daemon:
                await eventually(lambda: _ready(daemon, *users), WAIT, "ready")
                for user in users:
                    assert _policy(daemon, user) == PolicySettings(**HOST_POLICY)
                # peggy's engine works as any other.
                replace_link(peggy)
                await eventually(
                    lambda: FindingKind.LINK_REPLACED in _kinds(daemon, peggy), WAIT, "detected"
                )
        for user, path, why in (
            (mallory, shadow_link, "Permission denied"),
            (trudy, secret_link, "Permission denied"),
            (peggy, invalid, "policy.resync_interval"),
        ):
            (refused,) = _events(logs, "policy.user_file_refused", user)
            assert refused["log_level"] == "error"
            assert str(path) in refused["error"] and why in refused["error"]
            assert _events(logs, "policy.effective", user) == []
        assert (
            "metrics: unknown key" in _events(logs, "policy.user_file_refused", peggy)[0]["error"]
        )
        shown = repr(logs)
        assert secret not in shown
        assert not any(line and line in shown for line in SHADOW.read_text().splitlines())


class TestHostReload:
    """SIGHUP re-reads the system config: policy, allow and deny lists, the users' files."""

    async def test_a_reload_follows_allow_users_and_each_users_file(
        self, host_sandbox: HostSandbox, tmp_path: Path
    ) -> None:
        """ivan allowed, then judy too and ivan's new file, then judy alone: users come and go."""
        ivan, judy = host_sandbox.add_user(), host_sandbox.add_user()
        config = tmp_path / "config.toml"
        config.write_text(_config(host_sandbox, tmp_path, [ivan]))
        hup = asyncio.Event()
        load = partial(load_settings, config, host=True)
        with capture_logs() as logs:
            async with running_host(load(), load, hup) as daemon:
                await eventually(lambda: _ready(daemon, ivan), WAIT, "ivan ready")
                assert daemon.engine(judy.account.name) is None
                _write_policy(ivan, '[policy]\nneed_daemon_reload = "flag"\n')
                _write_policy(judy, "[policy]\nmax_reloads_per_hour = 3\n")
                config.write_text(
                    _config(host_sandbox, tmp_path, [ivan, judy], "resync_interval = 1800")
                )
                hup.set()
                await eventually(lambda: _ready(daemon, judy), WAIT, "judy followed")
                await eventually(
                    lambda: _policy(daemon, ivan).need_daemon_reload == "flag", WAIT, "ivan's file"
                )
                assert _policy(daemon, ivan).resync_interval == 1800
                assert _policy(daemon, judy).max_reloads_per_hour == 3
                assert _policy(daemon, judy).resync_interval == 1800
                config.write_text(_config(host_sandbox, tmp_path, [judy]))
                hup.set()
                # Logged once the engine has stopped, after its status went.
                await eventually(
                    lambda: _events(logs, "host.user_dropped", ivan), WAIT, "ivan dropped"
                )
                assert daemon.engine(ivan.account.name) is None
                assert ivan.account.name not in daemon.statuses()
                assert _ready(daemon, judy)
                await eventually(
                    lambda: _policy(daemon, judy).resync_interval == 900,
                    WAIT,
                    "judy's new host policy",
                )
                assert _policy(daemon, judy).max_reloads_per_hour == 3
        (dropped,) = _events(logs, "host.user_dropped", ivan)
        assert dropped["reason"] == "not allowed by host.allow_users/deny_users"
        assert len(_events(logs, "config.reloaded")) == 2

    async def test_a_broken_config_keeps_the_old_and_restart_keys_wait(
        self, host_sandbox: HostSandbox, tmp_path: Path
    ) -> None:
        """Invalid TOML: one error, same users and policy; a new listen address waits for a restart."""
        kate = host_sandbox.add_user()
        config = tmp_path / "config.toml"
        config.write_text(_config(host_sandbox, tmp_path, [kate], 'need_daemon_reload = "flag"'))
        hup = asyncio.Event()
        load = partial(load_settings, config, host=True)
        with capture_logs() as logs:
            async with running_host(load(), load, hup) as daemon:
                await eventually(lambda: _ready(daemon, kate), WAIT, "ready")
                before = daemon.settings
                config.write_text("[host\nallow_users = []\n")
                hup.set()
                await eventually(
                    lambda: _events(logs, "config.reload_failed"), WAIT, "reload failed"
                )
                assert daemon.settings == before
                assert _policy(daemon, kate).need_daemon_reload == "flag"
                assert _ready(daemon, kate)
                moved = _config(host_sandbox, tmp_path, [kate]).replace(
                    "127.0.0.1:0", "127.0.0.1:1"
                )
                config.write_text(moved)
                hup.set()
                await eventually(
                    lambda: _policy(daemon, kate).need_daemon_reload == "reload", WAIT, "reloaded"
                )
                assert daemon.settings.metrics.listen == "127.0.0.1:0"
        (failed,) = _events(logs, "config.reload_failed")
        assert "invalid TOML" in failed["error"]
        (waiting,) = _events(logs, "config.restart_needed")
        assert waiting["sections"] == ["metrics"]


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    """A datagram socket standing in for systemd's notify socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(tmp_path / "notify"))
        sock.settimeout(0)
        yield sock


def _drain(sock: socket.socket, into: list[str]) -> list[str]:
    with contextlib.suppress(BlockingIOError):
        while True:
            into.append(sock.recv(4096).decode())
    return into


class TestSighupProcess:
    def test_sighup_to_run_host_reloads_and_a_broken_file_is_survived(
        self, host_sandbox: HostSandbox, tmp_path: Path, notify_socket: socket.socket
    ) -> None:
        """``run --host`` as a process: SIGHUP with a broken file, then with the user denied."""
        lena = host_sandbox.add_user()
        config = tmp_path / "config.toml"
        config.write_text(_config(host_sandbox, tmp_path, [lena]))
        log_path = tmp_path / "daemon.log"
        env = {
            **host_sandbox.env,
            "PYTHONUNBUFFERED": "1",
            "NOTIFY_SOCKET": str(tmp_path / "notify"),
        }
        argv = [sys.executable, "-m", "provenanced", "--config", str(config), "run", "--host"]
        with log_path.open("wb") as out:
            proc = subprocess.Popen(
                argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )
        sent: list[str] = []

        def logged(event: str) -> list[str]:
            assert proc.poll() is None, log_path.read_text()
            return [
                line
                for line in log_path.read_text().splitlines()
                if f" event={event} " in f"{line} "
            ]

        try:
            wait_until(lambda: logged("host.user_followed"), WAIT, message="followed")
            wait_until(lambda: any("READY=1" in m for m in _drain(notify_socket, sent)), WAIT)
            sent.clear()
            config.write_text("[policy]\nquiet_window = -1\n")
            proc.send_signal(signal.SIGHUP)
            wait_until(lambda: logged("config.reload_failed"), WAIT, message="reload failed")
            wait_until(lambda: len(_drain(notify_socket, sent)) >= 2, WAIT, message="notified")
            assert sent[0].startswith("RELOADING=1\n") and sent[1].startswith("READY=1\n")
            denied = f'deny_users = ["{lena.account.name}"]\nallow_users'
            config.write_text(
                _config(host_sandbox, tmp_path, [lena]).replace("allow_users", denied)
            )
            proc.send_signal(signal.SIGHUP)
            wait_until(lambda: logged("host.user_dropped"), WAIT, message="dropped")
            assert len(logged("config.reloaded")) == 1
            assert "quiet_window" in logged("config.reload_failed")[0]
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0, log_path.read_text()
        assert "Traceback" not in log_path.read_text()

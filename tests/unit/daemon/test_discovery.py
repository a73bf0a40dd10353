"""Which user managers the runtime dirs show: a socket the directory's uid owns, nothing else."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from provenanced.config import HostSettings, load_settings
from provenanced.daemon.discovery import Logind, RuntimeDirs, probe_manager


def _manager_socket(root: Path, name: str, *, exist_ok: bool = False) -> Path:
    path = root / name / "systemd/private"
    path.parent.mkdir(parents=True, exist_ok=exist_ok)
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    sock.close()
    return path


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


class TestScanManagers:
    async def test_only_a_socket_owned_by_the_dirs_uid_counts(self, tmp_path: Path) -> None:
        """A uid dir with its own socket is found; a wrong owner, a link, a name or a file are not."""
        uid = os.getuid()
        _manager_socket(tmp_path, str(uid))
        _manager_socket(tmp_path, "4242")  # owned by us, not by uid 4242
        (tmp_path / "4343").symlink_to(tmp_path / str(uid))
        _manager_socket(tmp_path, "not-a-uid")
        (tmp_path / "4444/systemd").mkdir(parents=True)
        (tmp_path / "4444/systemd/private").write_text("")
        runtime = RuntimeDirs(str(tmp_path), lambda found: None)
        try:
            found = await runtime.scan()
            assert list(found) == [uid]
            manager = found[uid]
            assert manager.socket_path == f"{tmp_path}/{uid}/systemd/private"
            assert manager.env()["XDG_RUNTIME_DIR"] == str(tmp_path / str(uid))
        finally:
            runtime.close()

    async def test_a_missing_root_is_no_managers(self, tmp_path: Path) -> None:
        """No runtime root (no user logged in yet) is an empty host, not an error."""
        assert await RuntimeDirs(str(tmp_path / "absent"), lambda found: None).scan() == {}

    def test_the_address_reaches_the_socket_through_the_descriptor(self, tmp_path: Path) -> None:
        """unix:path=/proc/self/fd/N connects to the socket the probe opened."""
        path = tmp_path / str(os.getuid()) / "systemd/private"
        path.parent.mkdir(parents=True)
        with socket.socket(socket.AF_UNIX) as server, socket.socket(socket.AF_UNIX) as client:
            server.bind(str(path))
            server.listen()
            manager = probe_manager(str(tmp_path), os.getuid())
            assert manager is not None
            try:
                client.connect(manager.bus_address.removeprefix("unix:path="))
                server.accept()[0].close()
            finally:
                manager.close()

    async def test_rescans_keep_one_descriptor_per_manager(self, tmp_path: Path) -> None:
        """An unchanged socket keeps its descriptor across rescans; a new socket (the manager
        started again) is another manager with a fresh one; nothing is left open after."""
        uid = os.getuid()
        before = _open_fds()
        path = _manager_socket(tmp_path, str(uid))
        runtime = RuntimeDirs(str(tmp_path), lambda found: None)
        try:
            first = (await runtime.scan())[uid]
            for _ in range(3):
                again = (await runtime.scan())[uid]
                assert again is first
            assert len(_open_fds() - before) == 1
            path.unlink()
            _manager_socket(tmp_path, str(uid), exist_ok=True)
            restarted = (await runtime.scan())[uid]
            assert restarted != first
            assert len(_open_fds() - before) == 1
        finally:
            runtime.close()
        assert _open_fds() == before


class TestHostSettings:
    def test_allow_and_deny_lists(self) -> None:
        """Deny wins; an empty allow list allows everyone."""
        assert HostSettings().follows("alice")
        assert not HostSettings(deny_users=("alice",)).follows("alice")
        assert not HostSettings(allow_users=("bob",)).follows("alice")
        assert not HostSettings(allow_users=("alice",), deny_users=("alice",)).follows("alice")

    def test_run_host_sets_the_scope_and_reads_the_runtime_root_from_the_environment(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """load_settings(host=True): scope host; PROVENANCED_HOST__RUNTIME_ROOT is honoured."""
        config = tmp_path / "config.toml"
        config.write_text("")
        monkeypatch.setenv("PROVENANCED_HOST__RUNTIME_ROOT", "/srv/run/user")
        settings = load_settings(config, host=True)
        assert (settings.scope, settings.host.runtime_root) == ("host", "/srv/run/user")
        assert load_settings(config).scope == "user"


class TestLogind:
    async def test_no_system_bus_means_no_answer(self, tmp_path: Path) -> None:
        """Without a system bus logind is not asked: users() is None, the runtime dirs decide."""
        logind = Logind(f"unix:path={tmp_path}/system_bus_socket", timeout=2.0)
        try:
            assert await logind.users() is None
        finally:
            await logind.close()

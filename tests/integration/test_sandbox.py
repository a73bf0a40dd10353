"""The sandbox against the real thing: a booted systemd --user, a fake Nix store, journald."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import uuid
from pathlib import Path

import pytest
from systemd import journal

from helpers import wait_until
from provenanced.sandbox import (
    Generation,
    Journald,
    Sandbox,
    SandboxError,
    activate,
    boot,
    build_generation,
    ensure_journald,
    example_units,
)
from provenanced.sandbox import usermanager as sandbox_module
from provenanced.sandbox.hmstore import NIX_BASE32

pytestmark = pytest.mark.integration

UNITS = ("podman-web.service", "backup.service", "backup.timer")
_STORE_NAME = re.compile(rf"[{NIX_BASE32}]{{32}}-(?P<name>.+)")
_CFG = ".config/systemd/user"


def _alive(pid: int) -> bool:
    """A pid counts as alive while it is neither gone nor a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _main_pid(sandbox: Sandbox, unit: str) -> int:
    """The running main pid of a unit, waiting until the manager reports one."""
    return wait_until(
        lambda: int(sandbox.show(unit, "MainPID")["MainPID"]),
        message=f"{unit} has a main pid",
    )


class TestBoot:
    """The manager the sandbox boots is real, private and reachable."""

    def test_manager_reaches_running(self, sandbox: Sandbox) -> None:
        """Startup finishes with no failed unit."""
        state = sandbox.systemctl("is-system-running", check=False).stdout.strip()
        assert state == "running"

    def test_private_socket_is_a_socket(self, sandbox: Sandbox) -> None:
        """The manager listens on its private socket inside the sandbox runtime dir."""
        assert sandbox.private_socket == sandbox.runtime_dir / "systemd/private"
        assert stat.S_ISSOCK(sandbox.private_socket.lstat().st_mode)

    def test_user_bus_is_socket_activated(self, sandbox: Sandbox) -> None:
        """dbus.socket gives the sandbox its own user bus."""
        assert sandbox.bus_address == f"unix:path={sandbox.runtime_dir}/bus"
        assert stat.S_ISSOCK((sandbox.runtime_dir / "bus").lstat().st_mode)

    def test_admin_dir_comes_first_in_unit_path(self, sandbox: Sandbox) -> None:
        """SYSTEMD_UNIT_PATH with a trailing colon prepends admin_dir and keeps the defaults."""
        unit_path = sandbox.show(None, "UnitPath")["UnitPath"].split()
        assert unit_path[0] == str(sandbox.admin_dir)
        assert str(sandbox.config_dir) in unit_path
        assert f"{sandbox.runtime_dir}/systemd/user.control" in unit_path

    def test_manager_sees_only_sandbox_dirs(self, sandbox: Sandbox) -> None:
        """The manager's environment was built from scratch, pointing into the sandbox."""
        environ = Path(f"/proc/{sandbox.manager_pid}/environ").read_bytes().split(b"\0")
        assert f"HOME={sandbox.home}".encode() in environ
        assert f"XDG_RUNTIME_DIR={sandbox.runtime_dir}".encode() in environ

    def test_units_run_in_the_sandboxes_own_cgroup(
        self, sandbox: Sandbox, fresh_sandbox: Sandbox
    ) -> None:
        """Two sandboxes never share a unit cgroup, so stopping one cannot touch the other."""
        groups = [
            sb.show("podman-web.service", "ControlGroup")["ControlGroup"]
            for sb in (sandbox, fresh_sandbox)
        ]
        assert groups[0] != groups[1]
        for sb, group in zip((sandbox, fresh_sandbox), groups, strict=True):
            assert sb.cgroups
            assert all(group.startswith(f"/{cgroup.name}/") for cgroup in sb.cgroups)

    def test_env_ignores_callers_xdg(
        self, sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The child environment never inherits the caller's own XDG variables."""
        monkeypatch.setenv("XDG_CONFIG_HOME", "/nonexistent/config")
        monkeypatch.setenv("XDG_RUNTIME_DIR", "/nonexistent/run")
        env = sandbox.env
        assert env["XDG_CONFIG_HOME"] == str(sandbox.home / ".config")
        assert env["XDG_DATA_HOME"] == str(sandbox.home / ".local/share")
        assert env["XDG_STATE_HOME"] == str(sandbox.home / ".local/state")
        assert env["XDG_RUNTIME_DIR"] == str(sandbox.runtime_dir)
        assert env["DBUS_SESSION_BUS_ADDRESS"] == sandbox.bus_address
        assert env["PROVENANCED_STATE_DIR"] == str(sandbox.state_dir)
        assert env["LANG"] == "C.UTF-8"


class TestHomeManagerUnits:
    """The example tree loads exactly as Home Manager would have linked it."""

    @pytest.mark.parametrize("unit", UNITS)
    def test_unit_loads_from_config_dir(self, sandbox: Sandbox, unit: str) -> None:
        """Each example unit is loaded from the user config dir."""
        props = sandbox.show(unit, "LoadState", "FragmentPath")
        assert props["LoadState"] == "loaded"
        assert props["FragmentPath"] == str(sandbox.config_dir / unit)

    @pytest.mark.parametrize("unit", UNITS)
    def test_fragment_links_into_home_files(self, sandbox: Sandbox, unit: str) -> None:
        """The fragment is a symlink into the store's home-manager-files tree."""
        fragment = Path(sandbox.show(unit, "FragmentPath")["FragmentPath"])
        assert fragment.is_symlink()
        target = Path(os.readlink(fragment))
        top = target.relative_to(sandbox.store).parts[0]
        assert top.endswith("-home-manager-files")
        assert target == sandbox.store / top / fragment.relative_to(sandbox.home)

    @pytest.mark.parametrize("unit", UNITS)
    def test_fragment_resolves_to_read_only_store_file(self, sandbox: Sandbox, unit: str) -> None:
        """`readlink -f` of the fragment ends in a read-only `<hash>-<unit>` store file."""
        fragment = sandbox.config_dir / unit
        resolved = subprocess.run(
            ["readlink", "-f", str(fragment)],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        store_file = Path(resolved)
        assert store_file.parent == sandbox.store
        match = _STORE_NAME.fullmatch(store_file.name)
        assert match is not None
        assert match["name"] == unit
        assert stat.S_IMODE(store_file.stat().st_mode) == 0o444
        assert store_file == sandbox.generation.source(f"{_CFG}/{unit}")  # type: ignore[union-attr]

    def test_dropin_is_listed(self, sandbox: Sandbox) -> None:
        """The Home Manager drop-in shows in DropInPaths and takes effect."""
        props = sandbox.show("podman-web.service", "DropInPaths", "Environment")
        assert props["DropInPaths"] == str(sandbox.config_dir / "podman-web.service.d/10-env.conf")
        assert "WEB_PORT=8080" in props["Environment"].split()

    def test_wants_link_shares_the_units_store_file(self, sandbox: Sandbox) -> None:
        """A .wants/ entry resolves to the same store file as the unit it names."""
        wants = sandbox.config_dir / "default.target.wants/podman-web.service"
        assert wants.is_symlink()
        assert wants.resolve() == (sandbox.config_dir / "podman-web.service").resolve()

    @pytest.mark.parametrize("unit", ["podman-web.service", "backup.timer"])
    def test_wanted_units_start_at_boot(self, sandbox: Sandbox, unit: str) -> None:
        """default.target and timers.target pulled in the wanted units."""
        wait_until(
            lambda: sandbox.show(unit, "ActiveState")["ActiveState"] == "active",
            message=f"{unit} active",
        )

    def test_gcroot_points_at_the_generation(self, sandbox: Sandbox) -> None:
        """current-home and the profile both name the installed generation."""
        gen = sandbox.generation
        assert gen is not None
        state = sandbox.home / ".local/state"
        assert Path(os.readlink(state / "home-manager/gcroots/current-home")) == gen.path
        assert (state / "nix/profiles/home-manager").resolve() == gen.path
        assert (gen.path / "home-files").resolve() == gen.home_files


class TestBuildGeneration:
    """The fake store is laid out like Nix and Home Manager lay it out."""

    def test_same_input_same_store_paths(self, tmp_path: Path) -> None:
        """Store paths are content-addressed, so a rebuild reuses them."""
        first = build_generation(tmp_path, example_units())
        assert build_generation(tmp_path, example_units()) == first

    def test_name_hint_gives_a_distinct_generation(self, tmp_path: Path) -> None:
        """Equal files under another hint make a new generation over the same store files."""
        first = build_generation(tmp_path, example_units())
        other = build_generation(tmp_path, example_units(), name_hint="rebuild")
        assert other.path != first.path
        rel = f"{_CFG}/backup.service"
        assert other.source(rel) == first.source(rel)

    def test_layout(self, tmp_path: Path) -> None:
        """Store files are 0444, home-files holds links in real dirs, the generation links it."""
        gen = build_generation(tmp_path, example_units())
        assert gen.files == tuple(sorted(example_units()))
        assert _STORE_NAME.fullmatch(gen.path.name)
        assert gen.path.name.endswith("-home-manager-generation")
        assert gen.home_files.name.endswith("-home-manager-files")
        assert gen.home_files.parent == tmp_path
        assert Path(os.readlink(gen.path / "home-files")) == gen.home_files
        assert os.access(gen.path / "activate", os.X_OK)
        for rel in gen.files:
            entry = gen.home_files / rel
            assert entry.is_symlink()
            assert not entry.parent.is_symlink()
            assert stat.S_IMODE(gen.source(rel).stat().st_mode) == 0o444
            assert gen.source(rel).parent == tmp_path
        assert (
            gen.source(f"{_CFG}/podman-web.service.d/10-env.conf")
            .read_text()
            .startswith("[Service]")
        )

    def test_rejects_paths_outside_home(self, tmp_path: Path) -> None:
        """A path that climbs out of HOME is a programming error."""
        with pytest.raises(ValueError, match="home-relative"):
            build_generation(tmp_path, {"../escape.service": ""})


def _second_generation() -> dict[str, str]:
    """The example tree with podman-web changed and the backup units removed."""
    files = {rel: text for rel, text in example_units().items() if "backup" not in rel}
    files[f"{_CFG}/podman-web.service"] += "# rebuilt\n"
    return files


class TestActivate:
    """Activation switches links like Home Manager's linkGeneration and cleanOldGen."""

    def test_second_generation_retargets_and_drops(self, tmp_path: Path) -> None:
        """Kept links move to the new tree, removed ones go, user files stay."""
        home, store = tmp_path / "home", tmp_path / "store"
        first = build_generation(store, example_units())
        activate(home, first)
        user_file = home / _CFG / "mine.service"
        user_file.write_text("[Service]\nExecStart=/bin/true\n")
        second = build_generation(store, _second_generation())
        activate(home, second)
        web = home / _CFG / "podman-web.service"
        assert Path(os.readlink(web)) == second.home_files / _CFG / "podman-web.service"
        assert web.resolve() == second.source(f"{_CFG}/podman-web.service")
        assert web.resolve() != first.source(f"{_CFG}/podman-web.service")
        assert not os.path.lexists(home / _CFG / "backup.timer")
        assert not os.path.lexists(home / _CFG / "timers.target.wants")
        assert user_file.read_text().startswith("[Service]")

    def test_gcroot_and_profile_follow(self, tmp_path: Path) -> None:
        """current-home and a new profile generation point at the activated generation."""
        home, store = tmp_path / "home", tmp_path / "store"
        activate(home, build_generation(store, example_units()))
        second = build_generation(store, _second_generation())
        activate(home, second)
        state = home / ".local/state"
        assert Path(os.readlink(state / "home-manager/gcroots/current-home")) == second.path
        profile = state / "nix/profiles/home-manager"
        assert os.readlink(profile) == "home-manager-2-link"
        assert Path(os.readlink(profile.parent / "home-manager-2-link")) == second.path

    def test_refuses_a_file_in_the_way(self, tmp_path: Path) -> None:
        """A regular file where a link must go stops activation, as in Home Manager."""
        home = tmp_path / "home"
        (home / _CFG).mkdir(parents=True)
        (home / _CFG / "backup.service").write_text("mine")
        with pytest.raises(SandboxError, match="in the way"):
            activate(home, build_generation(tmp_path / "store", example_units()))
        assert (home / _CFG / "backup.service").read_text() == "mine"

    def test_manager_follows_a_new_generation(self, fresh_sandbox: Sandbox) -> None:
        """After install + reload, removed units are gone and kept ones load from the new store."""
        second = fresh_sandbox.install_home_manager(_second_generation())
        assert fresh_sandbox.show("backup.service", "LoadState")["LoadState"] == "not-found"
        fragment = fresh_sandbox.show("podman-web.service", "FragmentPath")["FragmentPath"]
        assert Path(fragment).resolve() == second.source(f"{_CFG}/podman-web.service")


class TestLifecycle:
    """Start, crash and stop leave nothing behind."""

    def test_stop_leaves_no_process(self) -> None:
        """stop() ends the manager and every service it started, and deletes the tree."""
        sandbox = boot()
        try:
            sandbox.install_home_manager()
            sandbox.systemctl("start", "podman-web.service")
            pids = [sandbox.manager_pid, _main_pid(sandbox, "podman-web.service")]
        finally:
            sandbox.stop()
        wait_until(lambda: not any(_alive(pid) for pid in pids), message=f"{pids} gone")
        assert not sandbox.root.exists()
        assert not any(cgroup.exists() for cgroup in sandbox.cgroups)
        sandbox.stop()

    def test_restart_manager_boots_a_new_one(self, fresh_sandbox: Sandbox) -> None:
        """A SIGKILLed manager is replaced by a new process over the same directories."""
        old_manager = fresh_sandbox.manager_pid
        old_service = _main_pid(fresh_sandbox, "podman-web.service")
        fresh_sandbox.restart_manager()
        assert fresh_sandbox.manager_pid != old_manager
        assert not _alive(old_manager)
        wait_until(lambda: not _alive(old_service), message="old podman-web gone")
        assert _main_pid(fresh_sandbox, "podman-web.service") != old_service
        assert fresh_sandbox.show("backup.timer", "LoadState")["LoadState"] == "loaded"

    def test_failed_boot_reports_the_log_tail(self, tmp_path: Path) -> None:
        """A manager that dies at boot raises SandboxError with its last words, and cleans up."""
        fake = tmp_path / "systemd"
        fake.write_text("#!/bin/sh\necho 'refusing to boot: simulated' >&2\nexit 1\n")
        fake.chmod(0o755)
        sandbox = Sandbox(systemd_binary=fake, timeout=10.0)
        with pytest.raises(SandboxError, match="simulated"), sandbox:
            pass
        assert not sandbox.root.exists()

    def test_context_manager_stops(self) -> None:
        """Leaving the with block stops the manager and removes the tree."""
        with Sandbox() as sandbox:
            pid = sandbox.manager_pid
            assert sandbox.running
        assert not _alive(pid)
        assert not sandbox.root.exists()

    def test_caller_root_is_never_deleted(self, tmp_path: Path) -> None:
        """stop() only removes a tree it created itself."""
        root = tmp_path / "sb"
        root.mkdir()
        (root / "mine").write_text("keep me")
        Sandbox(root).stop()
        assert (root / "mine").read_text() == "keep me"

    def test_unprivileged_without_booted_marker_says_so(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A non-root caller on a host without /run/systemd/system gets one clear sentence."""
        monkeypatch.setattr(sandbox_module, "BOOTED_MARKER", tmp_path / "absent")
        monkeypatch.setattr(os, "geteuid", lambda: 1000)
        with pytest.raises(SandboxError, match="create it once as root"), Sandbox(tmp_path / "sb"):
            pass


def _journal_entries(field: str, value: str) -> list[dict[str, str]]:
    """Entries matching one field, read back the way an operator would."""
    out = subprocess.run(
        ["journalctl", "--no-pager", "-o", "json", f"{field}={value}"],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


class TestJournald:
    """A journald accepts structured entries that journalctl reads back."""

    def test_entry_round_trips(self, journald: Journald | None) -> None:
        """systemd.journal.send fields are queryable with journalctl -o json."""
        marker = uuid.uuid4().hex
        journal.send(MESSAGE="x", PROVENANCED_TEST=marker)
        entries = wait_until(
            lambda: _journal_entries("PROVENANCED_TEST", marker), message="entry readable"
        )
        assert entries[0]["MESSAGE"] == "x"

    def test_ensure_journald_reuses_a_running_one(self, journald: Journald | None) -> None:
        """With journald up, ensure_journald starts nothing."""
        assert ensure_journald() is None


def test_generation_is_frozen(tmp_path: Path) -> None:
    """Generation values cannot be changed after the fact."""
    gen = build_generation(tmp_path, {"a/b.conf": "x"})
    assert isinstance(gen, Generation)
    with pytest.raises(AttributeError):
        gen.path = tmp_path  # type: ignore[misc]

"""The sandbox's Home Manager switch replays the real one, watched from outside.

The order of file changes is read from one inotify queue over the directories a switch touches,
so it is the kernel's order, not what the replay says about itself; the order of manager work
is read from the manager's own D-Bus signals.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from asyncinotify import Inotify, Mask

from daemonkit import eventually
from provenanced.sandbox import (
    FORMS,
    RELEASES,
    Form,
    Generation,
    Options,
    Release,
    Sandbox,
    SandboxError,
    activate,
    auto_upgrade_units,
    build_generation,
    example_switch,
    run_switch,
    switch,
)
from provenanced.sandbox.hmforms import AUTO_UPGRADE, USER_SERVICE
from provenanced.systemd import manager
from provenanced.systemd.bus import ManagerConnection, resolve_address

pytestmark = pytest.mark.integration

_CFG = ".config/systemd/user"
_GNU_TEMP = re.compile(r"Cu[A-Za-z0-9]{6}")
_NIX_TEMP = re.compile(r"(?P<root>new-home|current-home)\.tmp-\d+-\d+")
_CHANGES = Mask.CREATE | Mask.DELETE | Mask.MOVED_FROM | Mask.MOVED_TO


@dataclass(frozen=True)
class Change:
    """One inotify event: which directory, what happened, to which name."""

    directory: str  # gcroots, profiles, units, wants
    what: str  # create, delete, from, to
    name: str
    cookie: int


@dataclass(frozen=True)
class Switch:
    """The two generations of a switch and the paths it works on."""

    before: Generation
    after: Generation
    home: Path

    @property
    def gcroots(self) -> Path:
        return self.home / ".local/state/home-manager/gcroots"

    @property
    def profile(self) -> Path:
        return self.home / ".local/state/nix/profiles/home-manager"

    @property
    def units(self) -> Path:
        return self.home / _CFG


def _prepare(sandbox: Sandbox, release: Release, extra: dict[str, str] | None = None) -> Switch:
    """Activate the first generation of ``example_switch`` through the real switch."""
    before_files, after_files = example_switch()
    before = build_generation(sandbox.store, {**before_files, **(extra or {})}, "a", release)
    after = build_generation(sandbox.store, {**after_files, **(extra or {})}, "b", release)
    switch(sandbox.home, before, manager_env=sandbox.env)
    assert sandbox.show("old-sync.service", "ActiveState")["ActiveState"] == "active"
    return Switch(before, after, sandbox.home)


class FsRecorder:
    """Every create, delete and rename in a few directories, in the kernel's order."""

    _WHAT = ((Mask.CREATE, "create"), (Mask.DELETE, "delete"))
    _WHAT += ((Mask.MOVED_FROM, "from"), (Mask.MOVED_TO, "to"))

    def __init__(self, directories: dict[str, Path]) -> None:
        self.inotify = Inotify()
        self.inotify.sync_timeout = 0
        self.names: dict[str, str] = {}
        for label, path in directories.items():
            path.mkdir(parents=True, exist_ok=True)
            self.inotify.add_watch(path, _CHANGES | Mask.ONLYDIR | Mask.DONT_FOLLOW)
            self.names[str(path)] = label

    def drain(self) -> list[Change]:
        """Everything queued so far (the switch has finished when this is called)."""
        changes = []
        for event in self.inotify:
            what = next(w for mask, w in self._WHAT if event.mask & mask)
            label = self.names[str(event.watch.path)] if event.watch else "?"
            changes.append(Change(label, what, str(event.name), event.cookie))
        self.inotify.close()
        return changes


def _record(s: Switch, run: Callable[[], object]) -> list[Change]:
    """The file changes ``run()`` causes in gcroots, the profiles and the unit directories."""
    recorder = FsRecorder(
        {
            "gcroots": s.gcroots,
            "profiles": s.profile.parent,
            "units": s.units,
            "wants": s.units / "default.target.wants",
        }
    )
    run()
    return recorder.drain()


def _first(changes: list[Change], directory: str, what: str, name: str | re.Pattern[str]) -> int:
    """Index of the first matching change; fails the test when there is none."""
    for i, c in enumerate(changes):
        matches = c.name == name if isinstance(name, str) else name.fullmatch(c.name)
        if c.directory == directory and c.what == what and matches:
            return i
    raise AssertionError(f"no {what} of {name} in {directory}: {changes}")


def _unit_dir_indices(changes: list[Change]) -> list[int]:
    return [i for i, c in enumerate(changes) if c.directory in ("units", "wants")]


def _replaced_through_gnu_temp(changes: list[Change], directory: str, name: str) -> bool:
    """A `CuXXXXXX` link was created, then renamed onto ``name`` (same cookie), never deleted."""
    to = _first(changes, directory, "to", name)
    source = next(c for c in changes[:to] if c.what == "from" and c.cookie == changes[to].cookie)
    created = _first(changes, directory, "create", source.name)
    deleted = any(
        c.directory == directory and c.what == "delete" and c.name == name for c in changes
    )
    return bool(_GNU_TEMP.fullmatch(source.name)) and created < to and not deleted


class TestLinkOrder:
    """Files change in the order each Home Manager release changes them."""

    @pytest.mark.parametrize("release", ["25.11", "master"])
    def test_new_home_first_current_home_last(
        self, fresh_sandbox: Sandbox, release: Release
    ) -> None:
        """The CLI moves the profile, then new-home appears (temp + rename) before any link
        changes; current-home is renamed onto the new generation after the last link, and the
        exit trap removes new-home."""
        s = _prepare(fresh_sandbox, release)
        changes = _record(s, lambda: switch(s.home, s.after, manager_env=fresh_sandbox.env))
        profile = _first(changes, "profiles", "to", "home-manager")
        new_home_temp = _first(changes, "gcroots", "create", _NIX_TEMP)
        new_home = _first(changes, "gcroots", "to", "new-home")
        units = _unit_dir_indices(changes)
        current_home = _first(changes, "gcroots", "to", "current-home")
        new_home_gone = _first(changes, "gcroots", "delete", "new-home")
        assert profile < new_home_temp < new_home < units[0]
        assert units[-1] < current_home < new_home_gone == len(changes) - 1
        assert os.readlink(s.gcroots / "current-home") == str(s.after.path)
        assert not os.path.lexists(s.gcroots / "new-home")

    def test_release_24_11_moves_current_home_between_cleanup_and_linking(
        self, fresh_sandbox: Sandbox
    ) -> None:
        """Up to 24.11 there is no new-home: the removed link goes, then the profile and
        current-home move, then the kept links are retargeted."""
        s = _prepare(fresh_sandbox, "24.11")
        changes = _record(s, lambda: switch(s.home, s.after, manager_env=fresh_sandbox.env))
        removed = _first(changes, "units", "delete", "old-sync.service")
        profile = _first(changes, "profiles", "to", "home-manager")
        current_home = _first(changes, "gcroots", "to", "current-home")
        relinked = _first(changes, "units", "to", "podman-web.service")
        assert removed < profile < current_home < relinked
        assert not any(c.name.startswith("new-home") for c in changes)

    @pytest.mark.parametrize("release", RELEASES)
    def test_cleanup_then_links_replaced_through_gnu_temp_names(
        self, fresh_sandbox: Sandbox, release: Release
    ) -> None:
        """Removed links go first (and an emptied directory with them); every kept link is
        replaced by a `CuXXXXXX` temp link renamed over it, so it is never missing."""
        s = _prepare(fresh_sandbox, release)
        changes = _record(s, lambda: switch(s.home, s.after, manager_env=fresh_sandbox.env))
        removed = _first(changes, "units", "delete", "old-sync.service")
        first_temp = _first(changes, "units", "create", _GNU_TEMP)
        assert removed < first_temp
        for directory, name in (("units", "podman-web.service"), ("units", "backup.service")):
            assert _replaced_through_gnu_temp(changes, directory, name), (name, changes)
        assert _replaced_through_gnu_temp(changes, "wants", "podman-web.service")
        # A new link is a plain symlink(2): no temp name.
        new = _first(changes, "units", "create", "new-sync.service")
        assert not any(c.what == "to" and c.name == "new-sync.service" for c in changes[new:])
        target = os.readlink(s.units / "podman-web.service")
        assert target == str(s.after.home_files / _CFG / "podman-web.service")

    @pytest.mark.parametrize(("release", "relinked"), [("25.11", True), ("master", False)])
    def test_same_generation_again(
        self, fresh_sandbox: Sandbox, release: Release, relinked: bool
    ) -> None:
        """Activating the current generation again: 25.11 retargets every link anyway, master
        leaves links that are already right alone."""
        s = _prepare(fresh_sandbox, release)
        dirs = (s.units, s.units / "default.target.wants")
        links = [p for d in dirs for p in d.iterdir() if p.is_symlink()]
        assert len(links) == 6
        changes = _record(s, lambda: activate(s.home, s.before, manager_env=fresh_sandbox.env))
        temps = [c for c in changes if c.what == "create" and _GNU_TEMP.fullmatch(c.name)]
        assert len(temps) == (len(links) if relinked else 0)


class TestSdSwitch:
    """reloadSystemd stops removed units, reloads, then restarts and starts, after the links."""

    async def test_stop_before_reload_start_after(self, fresh_sandbox: Sandbox) -> None:
        """old-sync's stop job ends before the reload; new-sync starts and podman-web restarts
        after it; the kept backup.timer is left running untouched."""
        s = _prepare(fresh_sandbox, "25.11")
        web_started = fresh_sandbox.show("podman-web.service", "ExecMainStartTimestampMonotonic")
        timer_since = fresh_sandbox.show("backup.timer", "ActiveEnterTimestampMonotonic")
        events: list[tuple[str, str]] = []

        def on_event(event: manager.ManagerEvent) -> None:
            if isinstance(event, manager.JobRemoved):
                events.append(("job", event.unit))
            elif isinstance(event, manager.Reloading):
                events.append(("reloading", str(event.active)))

        conn = await ManagerConnection.connect(resolve_address(None, fresh_sandbox.env))
        try:
            await manager.subscribe(conn, on_event)
            log = await asyncio.to_thread(switch, s.home, s.after, manager_env=fresh_sandbox.env)
            await eventually(lambda: ("job", "new-sync.service") in events)
        finally:
            await conn.close()
        reload_started = events.index(("reloading", "True"))
        reload_done = events.index(("reloading", "False"))
        assert events.index(("job", "old-sync.service")) < reload_started
        assert reload_done < events.index(("job", "podman-web.service"))
        assert reload_done < events.index(("job", "new-sync.service"))
        assert ("job", "backup.timer") not in events
        calls = [op.path for op in log.ops if op.action == "systemctl"]
        assert calls == [
            "stop old-sync.service",
            "daemon-reload",
            "restart podman-web.service",
            "start new-sync.service",
        ]
        show = fresh_sandbox.show
        assert show("old-sync.service", "LoadState")["LoadState"] == "not-found"
        assert show("new-sync.service", "ActiveState")["ActiveState"] == "active"
        assert show("podman-web.service", "ExecMainStartTimestampMonotonic") != web_started
        assert show("backup.timer", "ActiveEnterTimestampMonotonic") == timer_since
        assert show("podman-web.service", "NeedDaemonReload")["NeedDaemonReload"] == "no"


class TestBackup:
    """checkLinkTargets refuses to clobber a file; `-b EXT` moves it to `NAME.EXT`."""

    @staticmethod
    def _in_the_way(tmp_path: Path, release: Release) -> tuple[Switch, Path]:
        before_files, after_files = example_switch()
        store, home = tmp_path / "store", tmp_path / "home"
        s = Switch(
            build_generation(store, before_files, "a", release),
            build_generation(store, after_files, "b", release),
            home,
        )
        switch(home, s.before)
        mine = home / _CFG / "new-sync.service"
        mine.write_text("[Service]\nExecStart=/bin/true\n# mine\n")
        return s, mine

    @pytest.mark.parametrize("release", RELEASES)
    def test_b_moves_the_file_aside(self, tmp_path: Path, release: Release) -> None:
        """With -b the user's file survives byte for byte as NAME.EXT and the link takes its place."""
        s, mine = self._in_the_way(tmp_path, release)
        content = mine.read_bytes()
        switch(s.home, s.after, options=Options(backup_ext="hm-bak"))
        assert mine.with_name("new-sync.service.hm-bak").read_bytes() == content
        assert os.readlink(mine) == str(s.after.home_files / _CFG / "new-sync.service")

    @pytest.mark.parametrize("release", RELEASES)
    def test_without_b_nothing_is_touched(self, tmp_path: Path, release: Release) -> None:
        """Without -b the check fails before any write: links, current-home and the user's file
        stay, and the exit trap still removes new-home. The CLI moved the profile already
        (25.11 and master), so it names a generation that never became current."""
        s, mine = self._in_the_way(tmp_path, release)
        content = mine.read_bytes()
        links = {p: os.readlink(p) for p in (s.home / _CFG).iterdir() if p.is_symlink()}
        with pytest.raises(SandboxError, match="in the way"):
            switch(s.home, s.after)
        assert mine.read_bytes() == content
        assert {p: os.readlink(p) for p in (s.home / _CFG).iterdir() if p.is_symlink()} == links
        assert os.readlink(s.gcroots / "current-home") == str(s.before.path)
        assert not os.path.lexists(s.gcroots / "new-home")
        assert (s.profile.resolve() == s.after.path) is (release != "24.11")

    def test_an_existing_backup_is_kept_unless_overwrite(self, tmp_path: Path) -> None:
        """NAME.EXT already there: refused; with HOME_MANAGER_BACKUP_OVERWRITE it is replaced."""
        s, mine = self._in_the_way(tmp_path, "25.11")
        backup = mine.with_name("new-sync.service.hm-bak")
        backup.write_text("older backup\n")
        with pytest.raises(SandboxError, match="would be clobbered by backing up"):
            switch(s.home, s.after, options=Options(backup_ext="hm-bak"))
        assert backup.read_text() == "older backup\n"
        content = mine.read_bytes()
        switch(s.home, s.after, options=Options(backup_ext="hm-bak", backup_overwrite=True))
        assert backup.read_bytes() == content


class TestForms:
    """The switch runs from a shell or inside the unit that wraps it, as configured."""

    @pytest.mark.parametrize("form", FORMS)
    def test_each_form(self, fresh_sandbox: Sandbox, form: Form) -> None:
        """Each form runs the activation where it really runs and moves the profile (or not)
        the way its driver version says; the switch completes in every form."""
        extra = auto_upgrade_units(fresh_sandbox) if form == "auto-upgrade" else None
        s = _prepare(fresh_sandbox, "master", extra)
        ops = run_switch(fresh_sandbox, s.after, form)
        start = next(op for op in ops if op.path == "activation-start")
        unit = {"user-service": USER_SERVICE, "auto-upgrade": AUTO_UPGRADE}
        assert start.detail.endswith(f"unit={unit.get(form, '-')}")
        assert os.readlink(s.gcroots / "current-home") == str(s.after.path)
        # The CLI (standalone, auto-upgrade) or writeBoundary (driver 0: the user unit) moves
        # the profile; the system unit's driver 1 without a CLI leaves it alone.
        assert (s.profile.resolve() == s.after.path) is (form != "system")
        show = fresh_sandbox.show
        assert show("new-sync.service", "ActiveState")["ActiveState"] == "active"
        if form in unit:
            expected = {"user-service": "oneshot", "auto-upgrade": "simple"}[form]
            assert show(unit[form], "Type")["Type"] == expected

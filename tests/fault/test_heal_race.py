"""Heal racing someone who keeps replacing the managed link: no version is ever lost."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hashlib
import json
import os
import random
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemonkit import WAIT, eventually, start_daemon, tmpfs_over
from helpers import wait_until
from provenanced.daemon.actions import Healer
from provenanced.fs.facts import FactReader
from provenanced.model import ExpectedLink, Finding, FindingKind, Tier, UnitDir
from provenanced.sandbox import Sandbox

pytestmark = pytest.mark.fault

VERSIONS = 40
SLOW_VERSIONS = 5
SLOW_WRITE_PAUSE = 0.6
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_libc = ctypes.CDLL(None, use_errno=True)


def _exchange(a: Path, b: Path) -> None:
    """renameat2(RENAME_EXCHANGE): swap two names atomically; neither inode is destroyed."""
    if _libc.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE):
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno), str(b))


class Replacer(threading.Thread):
    """Puts version after version of a hand-written file where the managed link is.

    Every version appears whole (a finished file linked or swapped in), and the replacer never
    destroys a regular file: in ``fill`` mode it only displaces a link or fills an empty name,
    in ``swap`` mode (an editor saving again and again) it atomically exchanges its next version
    with whatever is there and keeps what it got back. So a version that is neither in place,
    nor in quarantine, nor handed back was lost by the daemon.
    """

    def __init__(self, path: Path, scratch: Path, mode: str) -> None:
        super().__init__(name="test.replacer", daemon=True)
        self.path, self.scratch, self.mode = path, scratch, mode
        self.versions = [
            f"[Timer]\nOnCalendar=hourly\n# version {i}\n".encode() for i in range(VERSIONS)
        ]
        self.handed_back: list[bytes] = []
        self.placed = 0
        self.stop = threading.Event()
        self._jitter = random.Random(VERSIONS)

    def run(self) -> None:
        place = self._swap if self.mode == "swap" else self._fill
        for index, payload in enumerate(self.versions):
            staged = self.scratch / f"version-{index}"
            staged.write_bytes(payload)
            while not self.stop.is_set() and not place(staged):
                time.sleep(0.0005)
            with contextlib.suppress(FileNotFoundError):
                staged.unlink()
            if self.stop.is_set():
                return
            self.placed = index + 1
            time.sleep(self._jitter.uniform(0, 0.005))

    def _fill(self, staged: Path) -> bool:
        try:
            mode = os.lstat(self.path).st_mode
        except FileNotFoundError:
            mode = None
        if mode is not None and not stat.S_ISLNK(mode):
            return False  # our previous version is still there: the daemon has not moved it yet
        if mode is not None:
            # Only a link can be here: the daemon never writes regular files.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        try:
            os.link(staged, self.path)
        except FileExistsError:
            return False  # the daemon placed its link in between: displace it next round
        return True

    def _swap(self, staged: Path) -> bool:
        try:
            _exchange(staged, self.path)
        except FileNotFoundError:
            try:
                os.link(staged, self.path)  # nothing there (mid-heal): fill the empty name
            except FileExistsError:
                return False
            return True
        # ``staged`` now names what was in place: a link (dropped) or an earlier version (kept).
        if not staged.is_symlink():
            self.handed_back.append(staged.read_bytes())
        return True


def _quarantined(state_dir: Path) -> list[Path]:
    return [
        p
        for p in (state_dir / "quarantine").rglob("backup.timer")
        if p.is_file() and not p.is_symlink()
    ]


@pytest.fixture(params=["same-fs", "other-fs"])
def state_dir(request: pytest.FixtureRequest, fresh_sandbox: Sandbox) -> Iterator[Path]:
    """The quarantine next to the unit files (rename) or on another file system (copy)."""
    if request.param == "same-fs":
        yield fresh_sandbox.state_dir
        return
    with tmpfs_over(fresh_sandbox.state_dir, "16m") as path:
        yield path


class TestHealRace:
    @pytest.mark.parametrize("mode", ["fill", "swap"])
    async def test_every_version_is_in_place_quarantined_or_handed_back(
        self, fresh_sandbox: Sandbox, state_dir: Path, mode: str
    ) -> None:
        """A file replaced in a tight loop while the daemon heals it: not one version is lost."""
        sandbox = fresh_sandbox
        path = sandbox.config_dir / "backup.timer"
        target = os.readlink(path)
        scratch = sandbox.config_dir.parent / "replacer-scratch"  # same file system: link(2)
        scratch.mkdir()
        replacer = Replacer(path, scratch, mode)
        async with start_daemon(sandbox, heal={"link-replaced": "heal"}) as running:
            replacer.start()
            try:
                await eventually(
                    lambda: not replacer.is_alive(),
                    timeout=WAIT * 2,
                    what="every version placed",
                    state=lambda: (replacer.placed, running.findings()),
                )
            finally:
                replacer.stop.set()
                await asyncio.to_thread(replacer.join, 10)
            assert replacer.placed == VERSIONS
            # The last version is healed too, and the tree settles clean.
            await eventually(lambda: path.is_symlink() and os.readlink(path) == target)
            await eventually(lambda: not running.has(FindingKind.LINK_REPLACED, path))
            heals = running.sample("provenanced_heals_total", kind="link-replaced", result="ok")
            assert running.alive()
        quarantined = _quarantined(state_dir)
        found = [p.read_bytes() for p in quarantined] + replacer.handed_back
        missing = [v.decode() for v in replacer.versions if v not in found]
        assert missing == [], f"lost versions: {missing}"
        assert heals >= 1
        for copy in quarantined:
            assert Path(f"{copy}.provenanced.json").exists()


class SlowWriter(threading.Thread):
    """Saves version after version the way ``cat > f`` and many editors do: in place, slowly.

    Each version is one ``open(O_TRUNC)``, the head, a pause, the tail and ``close``. The store
    link the daemon puts back cannot be written through, so the writer removes it first, as a
    user would; it starts the next version only once the daemon has healed the previous one, so
    every version it completes must end up in place or in quarantine.
    """

    def __init__(self, path: Path, versions: int) -> None:
        super().__init__(name="test.slow-writer", daemon=True)
        self.path = path
        self.heads = [f"[Timer]\n# version {i}\n".encode() for i in range(versions)]
        self.tail = b"OnCalendar=hourly\nPersistent=true\n"
        self.completed: list[bytes] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for head in self.heads:
                wait_until(self.path.is_symlink, WAIT, message="the previous version healed")
                self.path.unlink()
                fd = os.open(
                    self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644
                )
                try:
                    os.write(fd, head)
                    time.sleep(SLOW_WRITE_PAUSE)  # the slow writer is the input under test
                    os.write(fd, self.tail)
                finally:
                    os.close(fd)
                self.completed.append(head + self.tail)
        except BaseException as exc:  # surfaced by the test, not lost in the thread
            self.error = exc


class TestSlowInPlaceWriter:
    async def test_no_version_lost_and_no_half_written_hash(
        self, fresh_sandbox: Sandbox, state_dir: Path
    ) -> None:
        """A file written slowly in place is healed only once whole: nothing lost, no half hash."""
        sandbox = fresh_sandbox
        path = sandbox.config_dir / "backup.timer"
        target = os.readlink(path)
        writer = SlowWriter(path, SLOW_VERSIONS)
        # Only flag stale loads: no reload resync retries a deferred heal; the engine must.
        async with start_daemon(
            sandbox, heal={"link-replaced": "heal"}, need_daemon_reload="flag"
        ) as running:
            writer.start()
            await eventually(
                lambda: not writer.is_alive(),
                timeout=WAIT * 2,
                what="every version written",
                state=lambda: (len(writer.completed), running.findings()),
            )
            await asyncio.to_thread(writer.join, 10)
            assert writer.error is None, writer.error
            await eventually(lambda: path.is_symlink() and os.readlink(path) == target)
            assert running.alive()
        assert len(writer.completed) == SLOW_VERSIONS
        quarantined = _quarantined(state_dir)
        kept = {p.read_bytes() for p in quarantined}
        lost = [v.decode() for v in writer.completed if v not in kept]
        half = [
            str(p)
            for p in quarantined
            if json.loads(Path(f"{p}.provenanced.json").read_text())["sha256"]
            != hashlib.sha256(p.read_bytes()).hexdigest()
            or p.read_bytes() not in writer.completed
        ]
        assert (lost, half) == ([], []), (
            f"{len(lost)} of {SLOW_VERSIONS} versions lost, {len(half)} of {len(quarantined)} "
            "quarantined copies half-written or with a sidecar hash of another content"
        )


class TestCrossDeviceQuarantine:
    def test_a_save_during_the_copy_is_not_unlinked(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """State dir on another file system: a new version saved while the old one is copied stays."""
        home = tmp_path / "home"
        units = home / ".config/systemd/user"
        units.mkdir(parents=True)
        target = tmp_path / "nix/store/aaaa-web.service"
        target.parent.mkdir(parents=True)
        target.write_text("[Service]\nExecStart=/bin/true\n")
        path = units / "web.service"
        path.write_text("old version")
        state = tmp_path / "state"
        state.mkdir()
        saved = threading.Event()
        real_fsync = os.fsync

        def fsync_then_save(fd: int) -> None:
            # The first fsync is the quarantine copy's: an editor saves right then (rename over).
            real_fsync(fd)
            if not saved.is_set():
                saved.set()
                (units / ".web.service.swp").write_text("new version, saved meanwhile")
                os.rename(units / ".web.service.swp", path)

        with tmpfs_over(state):
            healer = Healer(str(state), str(home))
            examined = FactReader().read(str(path))
            monkeypatch.setattr(os, "fsync", fsync_then_save)
            outcome = healer.heal(
                Finding(FindingKind.LINK_REPLACED, "web.service", str(path), "critical", "t"),
                examined,
                ExpectedLink(str(path), str(target), str(target), None),
                (UnitDir(str(units), Tier.CONFIG, 0),),
            )
            monkeypatch.undo()
            assert saved.is_set()
            kept = [p.read_text() for p in state.rglob("web.service")]
            if not path.is_symlink():
                kept.append(path.read_text())
            assert sorted(kept) == ["new version, saved meanwhile", "old version"], outcome

    def test_a_change_during_the_copy_aborts_and_discards_the_copy(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The file changes while it is copied: it stays at its path, and no copy is kept."""
        home = tmp_path / "home"
        units = home / ".config/systemd/user"
        units.mkdir(parents=True)
        target = tmp_path / "nix/store/aaaa-web.service"
        target.parent.mkdir(parents=True)
        target.write_text("[Service]\nExecStart=/bin/true\n")
        path = units / "web.service"
        path.write_text("old version")
        other_name = tmp_path / "web.service.hardlink"  # a second name the user writes through
        os.link(path, other_name)
        state = tmp_path / "state"
        state.mkdir()
        real_fsync = os.fsync
        edited = threading.Event()

        def fsync_then_edit(fd: int) -> None:
            # The first fsync is the quarantine copy's: the file is edited right then.
            real_fsync(fd)
            if not edited.is_set():
                edited.set()
                with other_name.open("a") as handle:
                    handle.write(", edited during the copy")

        with tmpfs_over(state):
            healer = Healer(str(state), str(home))
            examined = FactReader().read(str(path))
            monkeypatch.setattr(os, "fsync", fsync_then_edit)
            outcome = healer.heal(
                Finding(FindingKind.LINK_REPLACED, "web.service", str(path), "critical", "t"),
                examined,
                ExpectedLink(str(path), str(target), str(target), None),
                (UnitDir(str(units), Tier.CONFIG, 0),),
            )
            monkeypatch.undo()
            assert edited.is_set()
            assert not outcome.ok and outcome.retry_in is not None, outcome.detail
            assert path.read_text() == "old version, edited during the copy"
            assert [p for p in state.rglob("web.service*")] == []
            assert [p.name for p in units.iterdir()] == ["web.service"]


_HEAL_ONE = """
import json, sys
from provenanced.daemon.heal import Healer
from provenanced.fs.facts import FactReader
from provenanced.model import ExpectedLink, Finding, FindingKind, Tier, UnitDir
home, units, path, target, state = sys.argv[1:]
outcome = Healer(state, home).heal(
    Finding(FindingKind.LINK_REPLACED, "web.service", path, "critical", "t"),
    FactReader().read(path),
    ExpectedLink(path, target, target, None),
    (UnitDir(units, Tier.CONFIG, 0),),
)
print(json.dumps([outcome.ok, outcome.detail]))
"""


class TestWritersUnknowable:
    def test_a_file_that_cannot_be_leased_is_left_alone(self, tmp_path: Path) -> None:
        """Whether anyone writes another user's file cannot be told without CAP_LEASE: no heal."""
        home = tmp_path / "home"
        units = home / ".config/systemd/user"
        units.mkdir(parents=True)
        target = tmp_path / "nix/store/aaaa-web.service"
        target.parent.mkdir(parents=True)
        target.write_text("[Service]\nExecStart=/bin/true\n")
        path = units / "web.service"
        path.write_text("someone else's")
        os.chown(path, 65534, 65534)
        state = tmp_path / "state"
        # Root without CAP_LEASE may lease only its own files, as an ordinary user may.
        done = subprocess.run(
            [
                "setpriv",
                "--inh-caps=-lease",
                "--bounding-set=-lease",
                "--",
                sys.executable,
                "-c",
                _HEAL_ONE,
                *map(str, (home, units, path, target, state)),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        ok, detail = json.loads(done.stdout)
        assert not ok, detail
        assert "cannot tell whether" in detail and "Permission denied" in detail
        assert path.read_text() == "someone else's" and not path.is_symlink()
        assert not (state / "quarantine").exists()

"""The state directory is read-only or full: the old baseline survives and the daemon goes on."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from daemonkit import WAIT, eventually, start_daemon, tmpfs_over, unit_file
from provenanced.model import FindingKind
from provenanced.sandbox import Sandbox

pytestmark = pytest.mark.fault

K = FindingKind


class StateFs:
    """A small tmpfs mounted over the sandbox's state directory, that tests fill or freeze."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.filler = path / "filler"

    def fill(self) -> None:
        """Write until the file system says ENOSPC."""
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
        finally:
            os.close(fd)

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)

    def remount(self, mode: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{mode}", str(self.path)], check=True)

    def leftovers(self) -> list[str]:
        """Temp files an interrupted atomic write left behind."""
        return [p.name for p in self.path.rglob("*.tmp")]


@pytest.fixture
def state_fs(fresh_sandbox: Sandbox) -> Iterator[StateFs]:
    """A 1 MiB tmpfs over the state directory, unmounted whatever the test did."""
    with tmpfs_over(fresh_sandbox.state_dir) as path:
        yield StateFs(path)


def _accept(sandbox: Sandbox) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "provenanced", "baseline", "accept"],
        env=sandbox.env,
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
    )


class TestBaselineAccept:
    @pytest.mark.parametrize("fault", ["full", "read-only"])
    def test_previous_baseline_stays_intact(
        self, fresh_sandbox: Sandbox, state_fs: StateFs, fault: str
    ) -> None:
        """`baseline accept` on a full or read-only state dir fails in one line; the old baseline is byte-identical."""
        assert _accept(fresh_sandbox).returncode == 0
        baseline = state_fs.path / "baseline.json"
        before = baseline.read_bytes()
        unit_file(fresh_sandbox.config_dir, "new-since-baseline.service")
        if fault == "full":
            state_fs.fill()
        else:
            state_fs.remount("ro")
        result = _accept(fresh_sandbox)
        assert result.returncode == 2
        reason = "No space left on device" if fault == "full" else "Read-only file system"
        assert reason in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert baseline.read_bytes() == before
        assert state_fs.leftovers() == []
        # Once there is room (or write access) again, the same command succeeds.
        state_fs.free() if fault == "full" else state_fs.remount("rw")
        assert _accept(fresh_sandbox).returncode == 0
        assert b"new-since-baseline.service" in baseline.read_bytes()


class TestDaemonWithBrokenStateDir:
    async def test_read_only_state_dir_at_first_start(
        self, fresh_sandbox: Sandbox, state_fs: StateFs
    ) -> None:
        """No baseline can be recorded: the daemon says so once, audits with it in memory and keeps running."""
        state_fs.remount("ro")
        with capture_logs() as logs:
            async with start_daemon(fresh_sandbox) as running:
                assert running.findings() == set()
                extra = unit_file(fresh_sandbox.config_dir, "after-start.service")
                await eventually(lambda: running.has(K.UNMANAGED_UNIT, extra))
                assert running.alive()
        unwritable = [e for e in logs if e["event"] == "baseline.unwritable"]
        assert len(unwritable) == 1 and "Read-only file system" in unwritable[0]["error"]
        assert not (state_fs.path / "baseline.json").exists()

    async def test_accept_fails_while_running_then_succeeds(
        self, fresh_sandbox: Sandbox, state_fs: StateFs
    ) -> None:
        """A failed `baseline accept` leaves the daemon on the old baseline; a later one is picked up."""
        async with start_daemon(fresh_sandbox) as running:
            extra = unit_file(fresh_sandbox.config_dir, "to-be-accepted.service")
            await eventually(lambda: running.has(K.UNMANAGED_UNIT, extra))
            state_fs.fill()
            assert _accept(fresh_sandbox).returncode == 2
            assert running.alive() and running.has(K.UNMANAGED_UNIT, extra)
            state_fs.free()
            assert _accept(fresh_sandbox).returncode == 0
            await eventually(lambda: not running.has(K.UNMANAGED_UNIT, extra))
            assert running.findings() == set()


class TestHealWithBrokenStateDir:
    async def test_heal_into_a_full_state_dir_touches_nothing(
        self, fresh_sandbox: Sandbox, state_fs: StateFs
    ) -> None:
        """With no room for the quarantine copy the heal fails; the user's file stays where it was."""
        async with start_daemon(fresh_sandbox, heal={"link-replaced": "heal"}) as running:
            state_fs.fill()
            path = fresh_sandbox.config_dir / "backup.timer"
            payload = b"[Timer]\nOnCalendar=hourly\n# keep me\n" + os.urandom(64 * 1024)
            path.unlink()
            path.write_bytes(payload)
            await eventually(
                lambda: (
                    running.sample("provenanced_heals_total", kind="link-replaced", result="failed")
                    >= 1
                )
            )
            assert path.read_bytes() == payload and not path.is_symlink()
            assert running.has(K.LINK_REPLACED, path)
            assert running.alive()
            # No half-written copy is left in the quarantine to be mistaken for the file.
            assert [p for p in state_fs.path.rglob("backup.timer*")] == []

    async def test_heal_across_file_systems_copies_then_unlinks(
        self, fresh_sandbox: Sandbox, state_fs: StateFs
    ) -> None:
        """The state dir on another file system: the file is copied into quarantine intact, then linked."""
        async with start_daemon(fresh_sandbox, heal={"link-replaced": "heal"}) as running:
            path = fresh_sandbox.config_dir / "backup.timer"
            target = os.readlink(path)
            payload = b"[Timer]\nOnCalendar=weekly\n" + os.urandom(32 * 1024)
            path.unlink()
            path.write_bytes(payload)
            await eventually(lambda: path.is_symlink() and os.readlink(path) == target)
            (copy,) = [
                p for p in state_fs.path.rglob("backup.timer") if not p.name.endswith(".json")
            ]
            assert copy.read_bytes() == payload
            assert Path(f"{copy}.provenanced.json").exists()
            # The heal runs on the daemon's I/O thread: it is counted once it has returned.
            await eventually(
                lambda: (
                    running.sample("provenanced_heals_total", kind="link-replaced", result="ok")
                    == 1
                )
            )

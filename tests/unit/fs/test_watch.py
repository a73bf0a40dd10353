"""Raw inotify events become what the engine needs: changed paths, overflows, the watch limit.

The watcher runs on a real inotify fd over a tree in tmp_path; only the kernel conditions a test
cannot cause without changing a host-wide limit (ENOSPC, EACCES) come from an injected subclass.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from pathlib import Path
from typing import Any, ClassVar

import pytest
from asyncinotify import Inotify, Mask, Watch

from provenanced.fs import watch
from provenanced.fs.watch import (
    Overflow,
    PathChanged,
    UnitDirWatcher,
    WatchEvent,
    WatchLimitReached,
)

# Generous: a real kernel queue on a loaded 2-core box, never a measured claim.
WAIT = 10.0


class Events:
    """One watcher's event stream, read until a condition on everything seen so far holds."""

    def __init__(self, watcher: UnitDirWatcher) -> None:
        self.watcher = watcher
        self.seen: list[WatchEvent] = []
        self._stream = watcher.events()

    async def until(self, done: Callable[[list[WatchEvent]], bool]) -> list[WatchEvent]:
        async with asyncio.timeout(WAIT):
            while not done(self.seen):
                self.seen.append(await anext(self._stream))
        return self.seen

    async def changed(self, path: Path, is_dir: bool | None = None) -> list[WatchEvent]:
        """Read until ``path`` is reported changed (as a directory or not, when given)."""
        return await self.until(lambda seen: _changed(seen, path, is_dir))

    async def quiet_until(self, sentinel: Path) -> list[WatchEvent]:
        """Everything reported before ``sentinel`` is created: the kernel queues events in order."""
        sentinel.touch()
        seen = await self.changed(sentinel)
        return seen[: next(i for i, e in enumerate(seen) if _is(e, sentinel))]

    async def close(self) -> None:
        if isinstance(self._stream, AsyncGenerator):
            await self._stream.aclose()
        self.watcher.close()


def _is(event: WatchEvent, path: Path, is_dir: bool | None = None) -> bool:
    return (
        isinstance(event, PathChanged)
        and event.path == str(path)
        and (is_dir is None or event.is_dir is is_dir)
    )


def _changed(seen: list[WatchEvent], path: Path, is_dir: bool | None = None) -> bool:
    return any(_is(e, path, is_dir) for e in seen)


@pytest.fixture
def units(tmp_path: Path) -> Path:
    """A unit directory with one unit and one drop-in directory already in it."""
    root = tmp_path.resolve() / "user"
    (root / "web.service.d").mkdir(parents=True)
    (root / "web.service").write_text("[Service]\n")
    return root


@contextlib.asynccontextmanager
async def watching(roots: list[Path], extra: list[Path] | None = None) -> AsyncIterator[Events]:
    """A started watcher on ``roots`` (and ``extra`` dirs), closed on the way out."""
    watcher = UnitDirWatcher([str(r) for r in roots], [str(e) for e in extra or ()])
    watcher.refresh()
    stream = Events(watcher)
    try:
        yield stream
    finally:
        await stream.close()


@pytest.fixture
async def events(units: Path) -> AsyncIterator[Events]:
    async with watching([units]) as stream:
        yield stream


class TestFileChanges:
    @pytest.mark.parametrize(
        "change",
        [
            pytest.param(lambda p: p.write_text("[Service]\nX=1\n"), id="written"),
            pytest.param(lambda p: p.unlink(), id="deleted"),
            pytest.param(lambda p: p.chmod(0o666), id="chmod"),
            pytest.param(lambda p: os.rename(p, p.with_name("other.service")), id="moved-away"),
        ],
    )
    async def test_a_unit_file(
        self, units: Path, events: Events, change: Callable[[Path], object]
    ) -> None:
        """Writing, deleting, chmod-ing or moving a unit file reports that file, not as a directory."""
        change(units / "web.service")
        await events.changed(units / "web.service", is_dir=False)

    async def test_a_file_moved_in(self, tmp_path: Path, units: Path, events: Events) -> None:
        """A file renamed into the directory (how editors and Home Manager write) is reported."""
        staged = tmp_path / "staged.service"
        staged.write_text("[Service]\n")
        os.rename(staged, units / "new.service")
        await events.changed(units / "new.service", is_dir=False)

    async def test_a_symlink_replaced(self, tmp_path: Path, units: Path, events: Events) -> None:
        """A link renamed over a unit file (ln -sfT's temp link + rename) is reported."""
        tmp_link = units / ".tmp-link"
        tmp_link.symlink_to(tmp_path / "store-web.service")
        os.rename(tmp_link, units / "web.service")
        await events.changed(units / "web.service", is_dir=False)

    async def test_a_dropin_in_an_existing_dropin_directory(
        self, units: Path, events: Events
    ) -> None:
        """A drop-in written in a directory present at start is reported."""
        (units / "web.service.d/10-env.conf").write_text("[Service]\n")
        await events.changed(units / "web.service.d/10-env.conf", is_dir=False)


class TestNewDirectories:
    async def test_a_new_dropin_directory_is_watched(self, units: Path, events: Events) -> None:
        """A new ``.d`` directory is reported as a directory and the files later put in it too."""
        before = events.watcher.watch_count
        (units / "db.service.d").mkdir()
        await events.changed(units / "db.service.d", is_dir=True)
        assert events.watcher.watch_count == before + 1
        (units / "db.service.d/override.conf").write_text("[Service]\n")
        await events.changed(units / "db.service.d/override.conf", is_dir=False)

    @pytest.mark.parametrize("suffix", [".d", ".wants", ".requires", ".upholds"])
    async def test_a_directory_moved_in_names_its_files(
        self, tmp_path: Path, units: Path, events: Events, suffix: str
    ) -> None:
        """Files that came with a directory moved in at once are each reported."""
        staged = tmp_path / "staged"
        staged.mkdir()
        (staged / "a.conf").write_text("[Service]\n")
        (staged / "b.conf").write_text("[Service]\n")
        moved = units / f"db.service{suffix}"
        os.rename(staged, moved)
        await events.until(
            lambda seen: (
                _changed(seen, moved, True)
                and _changed(seen, moved / "a.conf", False)
                and _changed(seen, moved / "b.conf", False)
            )
        )

    async def test_other_subdirectories_are_not_watched(self, units: Path, events: Events) -> None:
        """A directory systemd does not read is reported once, and nothing inside it is."""
        before = events.watcher.watch_count
        (units / "notes").mkdir()
        (units / "notes/todo.service").write_text("[Service]\n")
        seen = await events.quiet_until(units / "sentinel.service")
        assert _changed(seen, units / "notes", is_dir=True)
        assert not _changed(seen, units / "notes/todo.service")
        assert events.watcher.watch_count == before

    async def test_a_linked_directory_is_not_followed(
        self, tmp_path: Path, units: Path, events: Events
    ) -> None:
        """A link to a directory is a changed path, never a watch: writes behind it are not seen."""
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        before = events.watcher.watch_count
        (units / "db.service.d").symlink_to(elsewhere)
        await events.changed(units / "db.service.d", is_dir=False)
        (elsewhere / "x.conf").write_text("[Service]\n")
        seen = await events.quiet_until(units / "sentinel.service")
        assert not any(str(elsewhere) in e.path for e in seen if isinstance(e, PathChanged))
        assert events.watcher.watch_count == before

    async def test_a_linked_dropin_directory_at_start_is_not_watched(
        self, tmp_path: Path, units: Path
    ) -> None:
        """A drop-in directory that is a link when watching starts gets no watch of its own."""
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        (units / "db.service.d").symlink_to(elsewhere)
        async with watching([units]) as stream:
            assert stream.watcher.watch_count == 2  # the root and web.service.d
            (elsewhere / "x.conf").write_text("[Service]\n")
            assert await stream.quiet_until(units / "sentinel.service") == []

    async def test_a_directory_swapped_for_a_link_is_not_followed(
        self, tmp_path: Path, units: Path, events: Events
    ) -> None:
        """A new drop-in directory replaced by a link before its event is read is not watched through."""
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        (units / "db.service.d").mkdir()
        (units / "db.service.d").rmdir()
        (units / "db.service.d").symlink_to(elsewhere)
        await events.changed(units / "db.service.d", is_dir=True)
        (elsewhere / "x.conf").write_text("[Service]\n")
        seen = await events.quiet_until(units / "sentinel.service")
        assert not any(str(elsewhere) in e.path for e in seen if isinstance(e, PathChanged))
        assert not _changed(seen, units / "db.service.d/x.conf")


class TestRoots:
    async def test_a_root_removed_and_created_again(self, units: Path, events: Events) -> None:
        """A deleted unit directory is reported, and once it is back its files are seen again."""
        (units / "web.service.d").rmdir()
        (units / "web.service").unlink()
        units.rmdir()
        await events.changed(units, is_dir=True)
        units.mkdir()
        await events.until(lambda seen: sum(_is(e, units, True) for e in seen) >= 2)
        (units / "back.service").write_text("[Service]\n")
        await events.changed(units / "back.service", is_dir=False)

    async def test_a_root_moved_away(self, units: Path, events: Events) -> None:
        """A unit directory renamed away is reported; the new one at its place is the one watched."""
        old = units.with_name("user.old")
        os.rename(units, old)
        await events.changed(units, is_dir=True)
        units.mkdir()
        # Its parent now reports the new directory; only then is it watched in turn.
        await events.until(lambda seen: sum(_is(e, units, True) for e in seen) >= 2)
        (old / "stale.service").write_text("[Service]\n")
        (units / "fresh.service").write_text("[Service]\n")
        seen = await events.changed(units / "fresh.service", is_dir=False)
        assert not any(e.path.startswith(str(old)) for e in seen if isinstance(e, PathChanged))

    async def test_a_missing_root_that_appears(self, tmp_path: Path) -> None:
        """A unit directory missing at start is reported when it and its parents appear at once."""
        root = tmp_path.resolve() / "a/b/user"
        async with watching([root]) as stream:
            root.mkdir(parents=True)
            await stream.changed(root, is_dir=True)
            (root / "late.service").write_text("[Service]\n")
            await stream.changed(root / "late.service", is_dir=False)

    async def test_extra_dirs_watch_their_files_only(self, tmp_path: Path, units: Path) -> None:
        """An extra directory (the gcroots) reports its files but is not recursed into."""
        gcroots = tmp_path.resolve() / "gcroots"
        (gcroots / "sub.d").mkdir(parents=True)
        async with watching([units], [gcroots]) as stream:
            (gcroots / "sub.d/x").write_text("")
            (gcroots / "current-home").symlink_to(tmp_path)
            seen = await stream.changed(gcroots / "current-home", is_dir=False)
            assert not _changed(seen, gcroots / "sub.d/x")


class TestOverflow:
    async def test_a_full_kernel_queue_is_an_overflow(self, units: Path, events: Events) -> None:
        """More events than the kernel queues give an Overflow (resync in full); watches stay."""
        # The queue length is fixed when the fd is made; another test may lower it for a while.
        knob = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
        a, b = units / "web.service", units / "a.service"
        b.write_text("")
        # Alternate two files: the kernel merges only identical consecutive events.
        for n in range(max(knob, 16384) + 1):
            (a if n % 2 else b).chmod(0o644)
        # Only the newest event is looked at: the stream holds some 16,000 before the overflow.
        await events.until(lambda seen: bool(seen) and isinstance(seen[-1], Overflow))
        (units / "after.service").write_text("[Service]\n")
        await events.changed(units / "after.service", is_dir=False)


class _Limited(Inotify):
    """A real inotify fd whose add_watch fails with ``error`` for the paths in ``refused``."""

    refused: ClassVar[set[str]] = set()
    error: ClassVar[int] = errno.ENOSPC

    def add_watch(self, path: os.PathLike[Any] | bytes | str, mask: Mask) -> Watch:
        if os.fsdecode(path) in self.refused:
            raise OSError(self.error, os.strerror(self.error), path)
        return super().add_watch(path, mask)


@pytest.fixture
def limited(monkeypatch: pytest.MonkeyPatch) -> type[_Limited]:
    """The watcher's inotify replaced by _Limited, with nothing refused yet."""
    monkeypatch.setattr(watch, "Inotify", _Limited)
    monkeypatch.setattr(_Limited, "refused", set())
    return _Limited


class TestWatchLimit:
    async def test_enospc_is_reported_once_and_degrades(
        self, units: Path, limited: type[_Limited]
    ) -> None:
        """Watches refused for want of inotify watches give one WatchLimitReached, then degraded."""
        dropins = units / "web.service.d"
        limited.refused = {str(dropins), str(units / "db.service.d")}
        (units / "db.service.d").mkdir()
        async with watching([units]) as stream:
            stream.watcher.refresh()
            assert stream.watcher.degraded
            assert stream.watcher.watch_count == 1
            seen = await stream.quiet_until(units / "sentinel.service")
            limits = [e for e in seen if isinstance(e, WatchLimitReached)]
            assert len(limits) == 1 and limits[0].path in limited.refused

    async def test_a_refresh_with_room_again_ends_degraded(
        self, units: Path, limited: type[_Limited]
    ) -> None:
        """Once every wanted watch is placed again, degraded mode ends and changes are seen."""
        limited.refused = {str(units)}
        async with watching([units]) as stream:
            assert stream.watcher.degraded
            limited.refused = set()
            stream.watcher.refresh()
            assert not stream.watcher.degraded
            (units / "web.service").write_text("[Service]\nX=1\n")
            await stream.changed(units / "web.service", is_dir=False)

    async def test_other_errors_do_not_degrade(
        self, units: Path, limited: type[_Limited], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A directory that cannot be watched for another reason (EACCES) is left to the backstop."""
        monkeypatch.setattr(limited, "error", errno.EACCES)
        limited.refused = {str(units / "web.service.d")}
        async with watching([units]) as stream:
            assert not stream.watcher.degraded
            (units / "web.service.d/x.conf").write_text("[Service]\n")
            assert await stream.quiet_until(units / "sentinel.service") == []

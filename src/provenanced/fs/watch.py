"""inotify on the unit directories: one watch per directory, recursion done by hand, never following links."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import posixpath
import time
from collections.abc import AsyncIterator, Iterable
from concurrent.futures import Executor
from dataclasses import dataclass

from asyncinotify import Event, Inotify, Mask, Watch

# systemd reads exactly one level of these below a unit directory.
SUBDIR_SUFFIXES = (".d", ".wants", ".requires", ".upholds")

_CHANGES = (
    Mask.CREATE
    | Mask.DELETE
    | Mask.CLOSE_WRITE
    | Mask.MOVED_FROM
    | Mask.MOVED_TO
    | Mask.ATTRIB
    | Mask.DELETE_SELF
    | Mask.MOVE_SELF
)
# asyncinotify's RecursiveInotify follows symlinked directories; these flags make sure we never do.
_SAFE = Mask.ONLYDIR | Mask.DONT_FOLLOW | Mask.EXCL_UNLINK
_DIR_MASK = _CHANGES | _SAFE
# The nearest existing parent of a missing root only needs to know when something appears.
_PARENT_MASK = Mask.CREATE | Mask.MOVED_TO | Mask.DELETE_SELF | Mask.MOVE_SELF | _SAFE


@dataclass(frozen=True, slots=True)
class PathChanged:
    """Something happened to ``path``; ``is_dir`` when a whole directory appeared or went away."""

    path: str
    is_dir: bool
    monotonic: float


@dataclass(frozen=True, slots=True)
class Overflow:
    """The kernel dropped events: only a full resync restores the truth."""

    monotonic: float


@dataclass(frozen=True, slots=True)
class WatchLimitReached:
    """A watch could not be added (ENOSPC): the daemon must fall back to periodic resyncs."""

    path: str


WatchEvent = PathChanged | Overflow | WatchLimitReached


class UnitDirWatcher:
    """Watches the unit directories (and the nearest parent of missing ones) with one inotify fd."""

    def __init__(
        self, roots: Iterable[str], extra_dirs: Iterable[str] = (), executor: Executor | None = None
    ) -> None:
        # Host mode: where listings and new watches run (the user's thread), never the loop.
        self.executor = executor
        self._roots = tuple(dict.fromkeys(posixpath.normpath(r) for r in roots))
        self._extra = tuple(dict.fromkeys(posixpath.normpath(r) for r in extra_dirs))
        self._inotify = Inotify()
        self._watches: dict[str, Watch] = {}
        self._pending: list[WatchEvent] = []
        self.degraded = False
        self._limit_hit = False  # since the last refresh, a watch failed for want of watches

    @property
    def roots(self) -> tuple[str, ...]:
        """The unit directories watched (or waited for)."""
        return self._roots

    @property
    def watch_count(self) -> int:
        """How many inotify watches are held now."""
        return len(self._watches)

    def close(self) -> None:
        """Release the inotify fd and every watch."""
        self._inotify.close()

    def __enter__(self) -> UnitDirWatcher:
        self.refresh()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def refresh(self) -> None:
        """(Re)establish watches on every root, its subdirectories and the parents of missing roots.

        Degraded mode ends once a refresh places every watch it wanted (the limit was raised).
        """
        self._limit_hit = False
        for root in (*self._roots, *self._extra):
            if _is_real_dir(root):
                self._watch_dir(root, _DIR_MASK)
                if root in self._roots:
                    for sub in _subdirs(root):
                        self._watch_dir(sub, _DIR_MASK)
            else:
                parent = _nearest_existing_parent(root)
                if parent is not None:
                    self._watch_dir(parent, _PARENT_MASK)
        if self.degraded and not self._limit_hit:
            self.degraded = False

    def _watch_dir(self, path: str, mask: Mask) -> bool:
        if path in self._watches:
            return True
        try:
            self._watches[path] = self._inotify.add_watch(path, mask)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                self._limit_hit = True
                if not self.degraded:
                    self.degraded = True
                    self._pending.append(WatchLimitReached(path))
            # EACCES, ENOENT (raced away), ENOTDIR (a link): the backstop resync still covers it.
            return False
        return True

    async def events(self) -> AsyncIterator[WatchEvent]:
        """Translate raw inotify events into what the engine needs to know."""
        while True:
            while self._pending:
                yield self._pending.pop(0)
            event = await self._inotify.get()
            if self.executor is None:
                translated = self._translate(event)
            else:
                loop = asyncio.get_running_loop()
                translated = await loop.run_in_executor(self.executor, self._translate, event)
            for change in translated:
                yield change

    def _translate(self, event: Event) -> list[WatchEvent]:
        now = time.monotonic()
        if Mask.Q_OVERFLOW in event.mask:
            return [Overflow(now)]
        watch = event.watch
        if watch is None:
            return []
        base = str(watch.path)
        if Mask.IGNORED in event.mask:
            # The path may already hold a newer watch (after a move): drop only this one.
            if self._watches.get(base) is watch:
                del self._watches[base]
            self.refresh()
            return [PathChanged(base, True, now)]
        if event.name is None:
            if Mask.MOVE_SELF in event.mask:
                # A watch follows its inode, so it now watches the directory's new place and no
                # IGNORED comes: let go of it (and those below it) so a new directory here is watched.
                self._forget(base)
                self.refresh()
            # DELETE_SELF: IGNORED follows and re-watches.
            return [PathChanged(base, True, now)]
        path = posixpath.join(base, str(event.name))
        is_dir = Mask.ISDIR in event.mask
        if Mask.CREATE in event.mask or Mask.MOVED_TO in event.mask:
            return self._appeared(base, path, is_dir, now)
        return [PathChanged(path, is_dir, now)]

    def _forget(self, directory: str) -> None:
        for path in [p for p in self._watches if p == directory or p.startswith(directory + "/")]:
            # EINVAL: the kernel dropped the watch already; its IGNORED is on its way.
            with contextlib.suppress(OSError):
                self._inotify.rm_watch(self._watches.pop(path))

    def _appeared(self, base: str, path: str, is_dir: bool, now: float) -> list[WatchEvent]:
        result: list[WatchEvent] = [PathChanged(path, is_dir, now)]
        if not is_dir:
            return result
        if base in self._roots and path.endswith(SUBDIR_SUFFIXES):
            # Watch first, then scan: whatever lands in between is seen by one or the other.
            self._watch_dir(path, _DIR_MASK)
            result.extend(PathChanged(p, False, now) for p in _entries(path))
        elif any(r == path or r.startswith(path + "/") for r in (*self._roots, *self._extra)):
            # A missing root (or one of its parents) appeared: watch it, then name each root that
            # now exists so the engine rescans it whole (files may have landed before the watch).
            self.refresh()
            result.extend(
                PathChanged(r, True, now)
                for r in self._roots
                if r != path and r.startswith(path + "/") and _is_real_dir(r)
            )
        return result


def _is_real_dir(path: str) -> bool:
    try:
        return os.path.isdir(path) and not os.path.islink(path)
    except OSError:
        return False


def _subdirs(root: str) -> list[str]:
    try:
        with os.scandir(root) as entries:
            return [
                e.path
                for e in entries
                if e.name.endswith(SUBDIR_SUFFIXES) and e.is_dir(follow_symlinks=False)
            ]
    except OSError:
        return []


def _entries(directory: str) -> list[str]:
    try:
        with os.scandir(directory) as entries:
            return [e.path for e in entries]
    except OSError:
        return []


def _nearest_existing_parent(path: str) -> str | None:
    parent = posixpath.dirname(path)
    while parent and parent != "/":
        if _is_real_dir(parent):
            return parent
        parent = posixpath.dirname(parent)
    return None

"""Which user managers run on this host: their runtime dirs, watched with inotify, and logind.

A user manager listens on ``<runtime_root>/<uid>/systemd/private``; the directory's name is
the uid. The socket appears when the manager starts and goes with the runtime dir when the
user leaves (logind removes it). What is in those directories is the users': a name that is
not a uid, a directory or socket owned by someone else, or a uid without an account is skipped.
A user may also mount there a file system that never answers: every look into a uid's
directory (its watches, its socket) is made on a thread, bounded, and the socket is reached
through a descriptor opened there (``/proc/self/fd/<n>``): the event loop never waits on a
user's tree.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import posixpath
import pwd
import stat
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from functools import partial
from types import MappingProxyType

import structlog
from asyncinotify import Inotify, Mask, Watch

from provenanced.errors import ManagerCallError, ManagerUnreachableError
from provenanced.fs.iothread import IoThread
from provenanced.systemd.bus import ManagerConnection, Transport

log = structlog.get_logger("provenanced.discovery")

PRIVATE_SOCKET = "systemd/private"
# Seconds a look into one user's runtime dir may take before that uid is set aside.
PROBE_TIMEOUT = 2.0
# Seconds between rescans when no event came: a watch that could not be placed in time.
BACKSTOP = 5.0
_MASK = (
    Mask.CREATE
    | Mask.DELETE
    | Mask.MOVED_FROM
    | Mask.MOVED_TO
    | Mask.ONLYDIR
    | Mask.DONT_FOLLOW
    | Mask.EXCL_UNLINK
)


@dataclass(frozen=True, slots=True)
class UserManager:
    """A running user manager: whose it is, where its runtime dir is, and its socket held open.

    ``fd`` is an ``O_PATH`` descriptor on the private socket; whoever holds the manager closes
    it. It takes no part in equality: two probes of the same socket are the same manager.
    """

    uid: int
    name: str
    gid: int
    home: str
    runtime_dir: str
    socket: tuple[int, int]  # (st_dev, st_ino): a manager started again has another socket
    fd: int = field(default=-1, compare=False)

    @property
    def socket_path(self) -> str:
        """Where the manager's private socket is, for people reading logs."""
        return posixpath.join(self.runtime_dir, PRIVATE_SOCKET)

    @property
    def bus_address(self) -> str:
        """The socket as a D-Bus address through our descriptor: the kernel follows the magic
        link to the socket itself, so connecting looks nothing up in the user's tree."""
        return f"unix:path=/proc/self/fd/{self.fd}"

    def dup(self) -> UserManager:
        """The same manager with a descriptor of its own (closed with ``close``)."""
        return replace(self, fd=os.dup(self.fd))

    def close(self) -> None:
        """Close the descriptor."""
        os.close(self.fd)

    def env(self) -> dict[str, str]:
        """The environment the user's manager and session see: home, runtime dir, names."""
        return {
            "HOME": self.home,
            "USER": self.name,
            "LOGNAME": self.name,
            "XDG_RUNTIME_DIR": self.runtime_dir,
            "PATH": "/usr/bin:/bin",
        }


def runtime_uids(runtime_root: str) -> list[int]:
    """The uids with a directory in the runtime root (root's own directory: listed on the loop)."""
    try:
        entries = list(os.scandir(runtime_root))
    except OSError:
        return []
    return [int(e.name) for e in entries if e.name.isdigit() and e.is_dir(follow_symlinks=False)]


def probe_manager(runtime_root: str, uid: int) -> UserManager | None:
    """The manager whose socket ``<runtime_root>/<uid>/systemd/private`` the uid owns, opened.

    Blocking, and the tree is the user's (a mount there may never answer): call on a thread.
    """
    runtime_dir = posixpath.join(runtime_root, str(uid))
    try:
        directory = os.lstat(runtime_dir)
        entry = pwd.getpwuid(uid)
    except (OSError, KeyError):
        return None
    # Another uid's directory under this name is not this user's.
    if not stat.S_ISDIR(directory.st_mode) or directory.st_uid != uid:
        return None
    flags = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(posixpath.join(runtime_dir, PRIVATE_SOCKET), flags)
    except OSError:
        return None
    try:
        # What was opened is checked, not the name again: no swap between check and use.
        socket = os.fstat(fd)
    except OSError:
        os.close(fd)
        return None
    if socket.st_uid != uid or not stat.S_ISSOCK(socket.st_mode) or _on_fuse(fd):
        os.close(fd)
        return None
    identity = (socket.st_dev, socket.st_ino)
    return UserManager(uid, entry.pw_name, entry.pw_gid, entry.pw_dir, runtime_dir, identity, fd)


def _on_fuse(fd: int) -> bool:
    """Whether ``fd`` lives on a FUSE file system, from /proc alone (never the user's server).

    A user's FUSE server could answer the probe, then hang the permission check of the connect
    on the loop; a manager's socket is never on FUSE. Unknown counts as FUSE: refused.
    """
    try:
        with open(f"/proc/self/fdinfo/{fd}", encoding="ascii") as info:
            mount_id = next(line.split()[1] for line in info if line.startswith("mnt_id:"))
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as mounts:
            for line in mounts:
                fields, _, fs = line.partition(" - ")
                if fields.split()[0] == mount_id:
                    return fs.split()[0].startswith("fuse")
    except (OSError, StopIteration, IndexError):
        pass
    return True


@dataclass(frozen=True, slots=True)
class _Look:
    """What one look into a uid's directory found: its manager, and the watches it placed."""

    manager: UserManager | None
    watches: Mapping[str, Watch]


def _look(runtime_root: str, uid: int, inotify: Inotify | None, unwatched: list[str]) -> _Look:
    """Watch ``unwatched`` (the uid's dir and its systemd dir) and probe its manager; blocking."""
    watches: dict[str, Watch] = {}
    if inotify is not None:
        for path in unwatched:
            with contextlib.suppress(OSError):
                watches[path] = inotify.add_watch(path, _MASK)
    return _Look(probe_manager(runtime_root, uid), watches)


def _on_thread(look: Callable[[], _Look]) -> Future[_Look]:
    """``look()`` on a thread of its own, which may hang for good without holding anyone."""
    thread = IoThread("discovery.look")
    try:
        return thread.submit(look)
    finally:
        thread.shutdown()  # the thread ends after its one look


def _close_late(probe: Future[_Look]) -> None:
    """A look that answered after it was given up: its manager is nobody's, close it.

    Runs on the look's own thread when it returns, so it needs no event loop still running.
    """
    if not probe.cancelled() and probe.exception() is None:
        manager = probe.result().manager
        if manager is not None:
            manager.close()


class RuntimeDirs:
    """Follows ``<runtime_root>``: calls ``on_change`` with every manager found, on each change.

    Each uid's directory is watched and looked at on a thread, for at most ``timeout`` seconds: a user owns
    it and may mount there a file system that never answers. A uid whose look has not returned
    keeps what was found before and is not looked at again until that look returns.
    The managers handed to ``on_change`` are ours: their descriptors stay open until a scan
    finds them gone or started again, so take ``dup()`` of the ones to keep, right away.
    """

    def __init__(
        self,
        runtime_root: str,
        on_change: Callable[[Mapping[int, UserManager]], None],
        timeout: float = PROBE_TIMEOUT,
    ) -> None:
        self.runtime_root = runtime_root
        self.timeout = timeout
        self._on_change = on_change
        self._watches: dict[str, Watch] = {}
        self._managers: dict[int, UserManager] = {}  # the latest scan's; the fds are ours
        self._stuck: dict[int, Future[_Look]] = {}
        self._inotify: Inotify | None = None  # while following

    async def follow(self) -> None:
        """Scan, watch what can change the result, wait for an event (or the backstop), repeat."""
        try:
            with Inotify() as inotify:
                self._inotify = inotify
                while True:
                    self._on_change(await self.scan())
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(BACKSTOP):
                            # Each event is one rescan: a burst costs a few listings of a small dir.
                            await inotify.get()
        finally:
            self._inotify = None
            self.close()

    async def scan(self) -> Mapping[int, UserManager]:
        """Every manager found now, by uid; the previous scan's that went are closed."""
        uids = runtime_uids(self.runtime_root)
        if self._inotify is not None:
            self._watch_root(self._inotify, uids)
        probes: dict[int, Future[_Look]] = {}
        for uid in uids:
            stuck = self._stuck.get(uid)
            if stuck is not None and not stuck.done():
                continue  # one hung thread per uid at most
            self._stuck.pop(uid, None)
            directory = posixpath.join(self.runtime_root, str(uid))
            paths = [directory, posixpath.join(directory, "systemd")]
            unwatched = [p for p in paths if p not in self._watches]
            probes[uid] = _on_thread(
                partial(_look, self.runtime_root, uid, self._inotify, unwatched)
            )
        if probes:
            waits = [asyncio.wrap_future(look) for look in probes.values()]
            try:
                await asyncio.wait(waits, timeout=self.timeout)
            except asyncio.CancelledError:  # stopping: nobody will take what the looks find
                for pending in probes.values():
                    pending.add_done_callback(_close_late)
                raise
        found: dict[int, UserManager] = {}
        for uid in uids:
            probe = probes.get(uid)
            if probe is None or not probe.done():
                if probe is not None:
                    self._stuck[uid] = probe
                    probe.add_done_callback(_close_late)
                    log.warning(
                        "host.runtime_dir_stuck",
                        uid=uid,
                        path=posixpath.join(self.runtime_root, str(uid)),
                        waited=self.timeout,
                    )
                if uid in self._managers:
                    found[uid] = self._managers[uid]
                continue
            self._watches.update(probe.result().watches)
            manager = probe.result().manager
            if manager is None:
                continue
            known = self._managers.get(uid)
            if known == manager:  # the same socket: keep the descriptor we hold
                manager.close()
                manager = known
            found[uid] = manager
        for uid, known in self._managers.items():
            if found.get(uid) is not known:
                known.close()
        self._managers = found
        return MappingProxyType(dict(found))

    def close(self) -> None:
        """Close every descriptor held; a probe still hung closes its own when it returns."""
        for manager in self._managers.values():
            manager.close()
        self._managers = {}

    def _watch_root(self, inotify: Inotify, uids: list[int]) -> None:
        """Watch the root (each uid's dirs are watched by its look); drop watches on what is gone."""
        wanted = {self.runtime_root}
        for uid in uids:
            directory = posixpath.join(self.runtime_root, str(uid))
            wanted |= {directory, posixpath.join(directory, "systemd")}
        for path in set(self._watches) - wanted:
            with contextlib.suppress(OSError, ValueError):
                inotify.rm_watch(self._watches.pop(path))  # by its number: no path looked up
        if self.runtime_root not in self._watches:
            with contextlib.suppress(OSError):
                self._watches[self.runtime_root] = inotify.add_watch(self.runtime_root, _MASK)


SYSTEM_BUS = "unix:path=/run/dbus/system_bus_socket"
_LOGIND = "org.freedesktop.login1"


class Logind:
    """logind's list of users (``ListUsers``) on the system bus, when it answers.

    The first source of who is on the host: a runtime dir whose uid logind does not list is
    not followed. Without a system bus, or when logind does not answer, ``users()`` is None
    and the runtime dirs alone decide.
    """

    def __init__(self, address: str = SYSTEM_BUS, timeout: float = 5.0) -> None:
        self.address = address
        self.timeout = timeout
        self._conn: ManagerConnection | None = None

    async def users(self) -> frozenset[int] | None:
        """The uids logind lists now, or None when it cannot be asked."""
        if not _bus_socket_exists(self.address):
            return None  # no system bus (a container, the test bed): nothing to ask
        try:
            if self._conn is None or not self._conn.connected:
                self._conn = await ManagerConnection.connect(
                    Transport(self.address, "explicit"), self.timeout
                )
            (listed,) = await self._conn.call(
                "ListUsers",
                interface=f"{_LOGIND}.Manager",
                path="/org/freedesktop/login1",
                destination=_LOGIND,
            )
        except (ManagerUnreachableError, ManagerCallError, ValueError) as exc:
            log.debug("logind.unavailable", address=self.address, error=str(exc))
            return None
        # Each entry is (uid, name, object path); anything else from the bus is ignored.
        return frozenset(
            e[0] for e in listed if isinstance(e, (list, tuple)) and e and isinstance(e[0], int)
        )

    async def close(self) -> None:
        """Drop the connection, if any."""
        if self._conn is not None:
            await self._conn.close()
            self._conn = None


def _bus_socket_exists(address: str) -> bool:
    """Whether a ``unix:path=`` address names an existing file (other addresses: assume so)."""
    path = address.removeprefix("unix:path=")
    return path == address or os.path.exists(path)

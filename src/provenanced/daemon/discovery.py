"""Which user managers run on this host: their runtime dirs, watched with inotify, and logind.

A user manager listens on ``<runtime_root>/<uid>/systemd/private``; the directory's name is
the uid. The socket appears when the manager starts and goes with the runtime dir when the
user leaves (logind removes it). What is in those directories is the users': a name that is
not a uid, a directory or socket owned by someone else, or a uid without an account is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import posixpath
import pwd
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import structlog
from asyncinotify import Inotify, Mask, Watch

from provenanced.errors import ManagerCallError, ManagerUnreachableError
from provenanced.systemd.bus import ManagerConnection, Transport

log = structlog.get_logger("provenanced.discovery")

PRIVATE_SOCKET = "systemd/private"
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
    """A running user manager: whose it is and where its runtime dir is."""

    uid: int
    name: str
    gid: int
    home: str
    runtime_dir: str

    @property
    def bus_address(self) -> str:
        """The manager's private socket as a D-Bus address."""
        return f"unix:path={posixpath.join(self.runtime_dir, PRIVATE_SOCKET)}"

    def env(self) -> dict[str, str]:
        """The environment the user's manager and session see: home, runtime dir, names."""
        return {
            "HOME": self.home,
            "USER": self.name,
            "LOGNAME": self.name,
            "XDG_RUNTIME_DIR": self.runtime_dir,
            "PATH": "/usr/bin:/bin",
        }


def scan_managers(runtime_root: str) -> dict[int, UserManager]:
    """Every user whose runtime dir holds a manager socket they own, keyed by uid."""
    found: dict[int, UserManager] = {}
    try:
        entries = list(os.scandir(runtime_root))
    except OSError:
        return found
    for entry in entries:
        if not entry.name.isdigit() or not entry.is_dir(follow_symlinks=False):
            continue
        manager = _manager_in(runtime_root, int(entry.name))
        if manager is not None:
            found[manager.uid] = manager
    return found


def _manager_in(runtime_root: str, uid: int) -> UserManager | None:
    runtime_dir = posixpath.join(runtime_root, str(uid))
    try:
        directory = os.lstat(runtime_dir)
        socket = os.lstat(posixpath.join(runtime_dir, PRIVATE_SOCKET))
        entry = pwd.getpwuid(uid)
    except (OSError, KeyError):
        return None
    # Another uid's directory or socket under this name is not this user's manager.
    if directory.st_uid != uid or socket.st_uid != uid or not stat.S_ISSOCK(socket.st_mode):
        return None
    return UserManager(uid, entry.pw_name, entry.pw_gid, entry.pw_dir, runtime_dir)


class RuntimeDirs:
    """Follows ``<runtime_root>``: calls ``on_change`` with every manager found, on each change."""

    def __init__(
        self, runtime_root: str, on_change: Callable[[Mapping[int, UserManager]], None]
    ) -> None:
        self.runtime_root = runtime_root
        self._on_change = on_change
        self._watches: dict[str, Watch] = {}

    async def follow(self) -> None:
        """Scan, watch what can change the result, wait for an event (or the backstop), repeat."""
        with Inotify() as inotify:
            while True:
                self._watch(inotify)
                self._on_change(scan_managers(self.runtime_root))
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(BACKSTOP):
                        # Each event is one rescan: a burst costs a few listings of a small dir.
                        await inotify.get()

    def _watch(self, inotify: Inotify) -> None:
        """Watch the root, each uid dir and its systemd dir; drop watches on what is gone."""
        wanted = [self.runtime_root]
        with contextlib.suppress(OSError):
            for entry in os.scandir(self.runtime_root):
                if entry.name.isdigit() and entry.is_dir(follow_symlinks=False):
                    wanted += [entry.path, posixpath.join(entry.path, "systemd")]
        for path in set(self._watches) - set(wanted):
            with contextlib.suppress(OSError, ValueError):
                inotify.rm_watch(self._watches.pop(path))
        for path in wanted:
            if path in self._watches:
                continue
            with contextlib.suppress(OSError):
                self._watches[path] = inotify.add_watch(path, _MASK)


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

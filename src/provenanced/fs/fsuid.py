"""Read and write a user's files with that user's rights: one thread per user, in the daemon.

Host mode runs as root in other people's homes. A user can point
``~/.config/systemd/user/x.service`` at ``/etc/shadow``; read with root's rights, its hash
(or a detail quoting it) would leak through findings, metrics and the journal, and a heal
written as root would follow a link the user planted. So every read and write of a user's tree
runs on a thread of its own whose *filesystem* credentials are the user's: the kernel checks
every open, stat, listing and creation against that uid, gid and groups, and a file it creates
belongs to the user.

Why a thread and not a helper process: Linux keeps credentials per thread. ``setfsuid`` and
``setfsgid`` change only the calling thread; so does the raw ``setgroups`` system call (glibc's
``setgroups()`` broadcasts the change to every thread of the process, so it is not used).
Changing the fsuid away from 0 also clears the filesystem capabilities (``CAP_DAC_OVERRIDE``,
``CAP_DAC_READ_SEARCH``, ``CAP_FOWNER``, ``CAP_CHOWN``, ...) from the thread's effective set
(capabilities(7), "Effect of user ID changes on capabilities"). ``unshare(CLONE_FS)`` gives the
thread its own umask. A thread costs a stack and a few objects where a helper process cost a
whole interpreter (docs/host-mode.md has the figures).

Everything the thread runs must be imported before it switches: the package may lie where only
root can read (a venv under ``/root``), and a lazy import as the user would fail.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import platform
import pwd
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

from provenanced.errors import ProvenancedError
from provenanced.expect.generation import read_generation
from provenanced.fs.facts import FactReader, scan_unit_dir
from provenanced.fs.iothread import IoThread
from provenanced.model import FileFact, HomeManagerGeneration, UnitDir

T = TypeVar("T")

# System call numbers: (setgroups, setfsuid, setfsgid); the libc wrappers are avoided on purpose.
_SYSCALLS = {"x86_64": (116, 122, 123), "aarch64": (159, 151, 152)}
_CLONE_FS = 0x200
# CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER, CAP_FSETID: gone once fsuid != 0.
_FS_CAPS = 0b11111
# Files and directories the thread creates (quarantine) are the user's alone.
_UMASK = 0o077


class AsUserError(ProvenancedError):
    """A user's thread could not take on the user's credentials."""


@dataclass(frozen=True, slots=True)
class Credentials:
    """Whom a thread acts as: the user's name, uid, primary gid and every group of theirs."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]

    @classmethod
    def of_uid(cls, uid: int) -> Credentials:
        """The credentials the user database gives ``uid``; KeyError if it has no entry."""
        entry = pwd.getpwuid(uid)
        groups = tuple(sorted(set(os.getgrouplist(entry.pw_name, entry.pw_gid))))
        return cls(entry.pw_name, uid, entry.pw_gid, groups)


def _syscalls() -> tuple[int, int, int]:
    numbers = _SYSCALLS.get(platform.machine())
    if numbers is None:
        raise AsUserError(f"no system call numbers known for {platform.machine()}")
    return numbers


_LIBC = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise AsUserError(f"{what} failed: {os.strerror(errno)}")


def become(creds: Credentials) -> None:
    """Give the calling thread (only) ``creds`` as its filesystem credentials and its own umask."""
    setgroups, setfsuid, setfsgid = _syscalls()
    _check(_LIBC.unshare(_CLONE_FS), "unshare(CLONE_FS)")
    os.umask(_UMASK)
    groups = (ctypes.c_uint * max(1, len(creds.groups)))(*creds.groups)
    _check(_LIBC.syscall(setgroups, len(creds.groups), groups), "setgroups")
    # setfsuid/setfsgid never report failure: they return the previous id; the check reads it back.
    _LIBC.syscall(setfsgid, creds.gid)
    _LIBC.syscall(setfsuid, creds.uid)


def thread_credentials(tid: int) -> tuple[int, int, tuple[int, ...], int]:
    """(fsuid, fsgid, groups, effective capabilities) of thread ``tid`` of this process."""
    with open(f"/proc/self/task/{tid}/status", encoding="ascii", errors="replace") as status:
        fields = {k: v.split() for k, _, v in (line.partition(":") for line in status)}
    return (
        int(fields["Uid"][3]),
        int(fields["Gid"][3]),
        tuple(sorted(int(g) for g in fields.get("Groups", []))),
        int(fields["CapEff"][0], 16),
    )


def check_thread(tid: int, creds: Credentials) -> None:
    """What the kernel says thread ``tid`` acts as must be ``creds``; AsUserError otherwise."""
    fsuid, fsgid, groups, caps = thread_credentials(tid)
    problems = []
    if (fsuid, fsgid) != (creds.uid, creds.gid):
        problems.append(f"fsuid/fsgid {fsuid}/{fsgid}")
    if set(groups) != set(creds.groups):
        problems.append(f"groups {list(groups)}")
    if creds.uid != 0 and caps & _FS_CAPS:
        problems.append(f"filesystem capabilities {caps & _FS_CAPS:#x}")
    if problems:
        raise AsUserError(f"thread {tid} does not act as {creds.name}: {', '.join(problems)}")


class UserThread:
    """One thread acting with a user's filesystem rights; every call for that user runs there.

    One thread per user, so a read that hangs (a stuck FUSE mount in their home) stalls only
    that user's calls, queued behind it.
    """

    def __init__(self, creds: Credentials) -> None:
        self.creds = creds
        self.tid = 0
        self._executor = IoThread(f"as-{creds.name}")

    @classmethod
    async def start(cls, creds: Credentials) -> UserThread:
        """A thread that switched to ``creds`` and was checked from outside."""
        thread = cls(creds)
        try:
            thread.tid = await thread.run(_switch, creds)
            check_thread(thread.tid, creds)
        except BaseException:
            thread.close()
            raise
        return thread

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` on the user's thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, partial(fn, *args))

    def executor(self) -> Executor:
        """The executor behind the thread, for code that takes one."""
        return self._executor

    async def facts(
        self, paths: Iterable[str], reader: FactReader | None = None
    ) -> dict[str, FileFact]:
        """The ``FileFact`` of each path as the user sees it, keyed by path."""
        return await self.run((reader or FactReader()).read_many, sorted(set(paths)))

    async def scan(self, dirs: Sequence[str]) -> tuple[str, ...]:
        """Every file in the unit directories ``dirs``, listed as the user may list them."""
        return await self.run(_scan, tuple(dirs))

    async def generation(
        self, home: str, unit_dirs: Sequence[UnitDir], reader: FactReader | None = None
    ) -> HomeManagerGeneration:
        """The user's current Home Manager generation, followed and hashed as the user."""
        return await self.run(read_generation, home, tuple(unit_dirs), reader or FactReader())

    def close(self) -> None:
        """Let the thread end after what it runs now; queued calls are cancelled."""
        self._executor.shutdown(wait=False, cancel_futures=True)


def _switch(creds: Credentials) -> int:
    become(creds)
    return threading.get_native_id()


def _scan(dirs: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(path for d in dirs for path in scan_unit_dir(d))

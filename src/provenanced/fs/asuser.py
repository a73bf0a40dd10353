"""Read a user's files with that user's rights: one long-lived helper process per user.

Host mode runs as root in other people's homes. A user can point
``~/.config/systemd/user/x.service`` at ``/etc/shadow``; read with root's rights, its hash
(or a detail quoting it) would leak through findings, metrics and the journal. So every read
of a user's tree goes through a helper that holds only that user's uid, gid and groups, and
the kernel's own permission checks say what the user could not read.

Why a fresh interpreter (``python -I -m provenanced.fs.userhelper``) and not ``os.fork``: the
daemon runs an event loop, the metrics thread and asyncio's child watcher; a forked child
inherits locks other threads may hold and must not run Python code safely, while a fresh
interpreter starts clean and single-threaded.

Why the helper drops privileges itself instead of ``Popen(user=, group=, extra_groups=)``:
those switch ids before ``exec``, so the interpreter and the package must be readable by the
user. Measured here: this venv's Python lives under ``/root`` (mode 0700) and exec as an
unprivileged uid fails with EACCES, as it would for any root-only install (pipx, a venv in
``/root``). The helper imports everything first, then switches (setgroups, setresgid,
setresuid: no saved id left), verifies, and only then accepts requests; the daemon checks the
switch again from outside in ``/proc/<pid>/status``. A side effect: a process whose ids were
switched by a syscall is not dumpable, so the user cannot ptrace it.

The helper's death, a reply that breaks the protocol, or a request that outlives its timeout
all end the helper (SIGKILL) and raise ``AsUserError``; the caller starts a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

from provenanced.errors import ProvenancedError, one_line
from provenanced.fs import wire
from provenanced.model import FileFact, HomeManagerGeneration, UnitDir

T = TypeVar("T")

HELPER_MODULE = "provenanced.fs.userhelper"
DEFAULT_TIMEOUT = 10.0
# Paths per request. A fact holds up to four paths (path, target, resolved, real_path) of up to
# 4 KiB each, 24 KiB once JSON escapes every byte: 128 facts stay below REPLY_MAX.
BATCH = 128
_HELLO_MAX = 4096
# Seconds a helper whose input was closed gets to exit by itself.
_EXIT_GRACE = 1.0
_STDERR_MAX = 4096
_HELPER_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}


class AsUserError(ProvenancedError):
    """A helper running as a user failed, timed out, died or broke the protocol."""


@dataclass(frozen=True, slots=True)
class Credentials:
    """Whom a helper runs as: the user's name, uid, primary gid and every group of theirs."""

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


def _proc_status(pid: int) -> dict[str, list[str]]:
    with open(f"/proc/{pid}/status", encoding="utf-8", errors="replace") as status:
        return {key: rest.split() for key, _, rest in (line.partition(":") for line in status)}


def check_credentials(pid: int, creds: Credentials) -> None:
    """What the kernel says ``pid`` runs as must be exactly ``creds``; AsUserError otherwise."""
    status = _proc_status(pid)
    problems = []
    if status.get("Uid") != [str(creds.uid)] * 4:
        problems.append(f"Uid {status.get('Uid')}")
    if status.get("Gid") != [str(creds.gid)] * 4:
        problems.append(f"Gid {status.get('Gid')}")
    if {int(g) for g in status.get("Groups", [])} != set(creds.groups):
        problems.append(f"Groups {status.get('Groups')}")
    if creds.uid != 0:
        for key in ("CapPrm", "CapEff", "CapAmb"):
            if int(status.get(key, ["1"])[0], 16) != 0:
                problems.append(f"{key} {status.get(key)}")
    if problems:
        raise AsUserError(f"helper {pid} does not run as {creds.name}: {', '.join(problems)}")


def _error_of(reply: dict[str, Any]) -> str:
    """The error a reply reports, fit for one log line (paths in it are the user's)."""
    error = reply.get("error")
    return one_line(error if isinstance(error, str) else str(reply), 300)


class UserHelper:
    """A helper process holding one user's credentials; one request at a time, each bounded."""

    def __init__(
        self, proc: asyncio.subprocess.Process, creds: Credentials, timeout: float
    ) -> None:
        self.creds = creds
        self.timeout = timeout
        self._proc = proc
        self._lock = asyncio.Lock()
        self._failure: str | None = None

    @classmethod
    async def start(
        cls,
        creds: Credentials,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        module: str = HELPER_MODULE,
    ) -> UserHelper:
        """Start a helper for ``creds`` and return once it proved it runs as them."""
        argv = ["--uid", str(creds.uid), "--gid", str(creds.gid)]
        argv += ["--groups", ",".join(map(str, creds.groups))]
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-I",
                "-m",
                module,
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                # Read only once it died, to say why: it writes there only when it crashes.
                stderr=asyncio.subprocess.PIPE,
                env=_HELPER_ENV,
                cwd="/",
                start_new_session=True,
            )
        except OSError as exc:
            raise AsUserError(f"cannot start a helper for {creds.name}: {exc}") from exc
        helper = cls(proc, creds, timeout)
        try:
            async with helper._lock:
                hello = await helper._bounded(helper._receive(_HELLO_MAX), "starting")
                if hello.get("ok") is not True or hello.get("pid") != proc.pid:
                    await helper._fail(f"refused to start: {_error_of(hello)}")
                check_credentials(proc.pid, creds)
        except BaseException:
            await helper._end()
            raise
        return helper

    @property
    def pid(self) -> int:
        """The helper's pid, for logs and for tests that kill it."""
        return self._proc.pid

    @property
    def alive(self) -> bool:
        """Whether the helper can still answer; False once it failed or exited."""
        return self._failure is None and self._proc.returncode is None

    # requests

    async def call(self, op: str, **args: Any) -> dict[str, Any]:
        """One request and its reply; an error reply raises AsUserError, the helper lives on."""
        async with self._lock:
            if not self.alive:
                raise AsUserError(self._describe(self._failure or "has exited"))
            frame = wire.encode_frame({"op": op, **args}, wire.REQUEST_MAX)
            reply = await self._bounded(self._exchange(frame), op)
        if reply.get("ok") is not True:
            raise AsUserError(self._describe(f"{op} failed: {_error_of(reply)}"))
        return reply

    async def decode(self, kind: type[T], data: Any, where: str) -> T:
        """Decode part of a reply as ``kind``; a malformed one ends the helper (AsUserError)."""
        try:
            return wire.from_wire(kind, data, where)
        except wire.WireError as exc:
            await self._fail(f"sent a malformed reply: {exc}")

    async def facts(self, paths: Iterable[str]) -> dict[str, FileFact]:
        """The ``FileFact`` of each path as the user sees it, keyed by path."""
        wanted = list(dict.fromkeys(paths))
        facts: dict[str, FileFact] = {}
        for start in range(0, len(wanted), BATCH):
            batch = wanted[start : start + BATCH]
            reply = await self.call("facts", paths=batch)
            got = await self.decode(tuple[FileFact, ...], reply.get("facts"), "facts")
            if [fact.path for fact in got] != batch:
                await self._fail("answered facts for other paths than asked")
            facts.update((fact.path, fact) for fact in got)
        return facts

    async def scan(self, dirs: Sequence[str]) -> tuple[str, ...]:
        """Every file in the unit directories ``dirs``, listed as the user may list them.

        A listing past REPLY_MAX (about 100,000 entries) is an AsUserError, not a partial list.
        """
        reply = await self.call("scan", dirs=list(dirs))
        return await self.decode(tuple[str, ...], reply.get("paths"), "paths")

    async def generation(self, home: str, unit_dirs: Sequence[UnitDir]) -> HomeManagerGeneration:
        """The user's current Home Manager generation, followed and hashed as the user."""
        reply = await self.call("generation", home=home, unit_dirs=wire.to_wire(tuple(unit_dirs)))
        return await self.decode(HomeManagerGeneration, reply.get("generation"), "generation")

    async def close(self) -> None:
        """Close the helper's input (it exits on its own), bounded; SIGKILL if it lingers."""
        async with self._lock:
            if self._failure is None:
                self._failure = "was closed"
            await self._end()

    # the pipe

    async def _exchange(self, frame: bytes) -> dict[str, Any]:
        stdin = self._proc.stdin
        assert stdin is not None
        stdin.write(frame)
        await stdin.drain()
        return await self._receive(wire.REPLY_MAX)

    async def _receive(self, limit: int) -> dict[str, Any]:
        stdout = self._proc.stdout
        assert stdout is not None
        length = wire.frame_length(await stdout.readexactly(wire.HEADER.size), limit)
        return wire.decode_body(await stdout.readexactly(length))

    async def _bounded(self, exchange: Any, what: str) -> dict[str, Any]:
        """Await one exchange within the timeout; any failure ends the helper and raises."""
        try:
            async with asyncio.timeout(self.timeout):
                reply: dict[str, Any] = await exchange
                return reply
        except TimeoutError:
            await self._fail(f"gave no answer to {what} within {self.timeout:g} s")
        except asyncio.IncompleteReadError:
            await self._end()  # it closed its output: collect how it ended
            await self._fail(f"died during {what} ({self._exit_text()}){await self._last_words()}")
        except (ConnectionError, wire.WireError) as exc:
            await self._fail(f"broke the protocol during {what}: {exc}")

    async def _fail(self, reason: str) -> NoReturn:
        """End the helper for good and raise the reason; every later call raises it too."""
        self._failure = reason
        await self._end(grace=0.0)
        raise AsUserError(self._describe(reason))

    async def _end(self, grace: float = _EXIT_GRACE) -> None:
        """Close stdin, give the helper ``grace`` seconds to exit, then SIGKILL it and reap it."""
        if self._proc.stdin is not None and not self._proc.stdin.is_closing():
            self._proc.stdin.close()
        if self._proc.returncode is None and grace > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await self._proc.wait()
        if self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
            await self._proc.wait()

    async def _last_words(self) -> str:
        """The last line a dead helper wrote to stderr (its exception), quoted for one log line."""
        stderr = self._proc.stderr
        if stderr is None:
            return ""
        try:
            async with asyncio.timeout(_EXIT_GRACE):
                text = (await stderr.read(_STDERR_MAX)).decode("utf-8", "replace")
        except TimeoutError:
            return ""
        lines = [line for line in text.splitlines() if line.strip()]
        return f": {one_line(lines[-1], 200)}" if lines else ""

    def _exit_text(self) -> str:
        code = self._proc.returncode
        if code is None:
            return "still running"
        return f"killed by signal {-code}" if code < 0 else f"exit status {code}"

    def _describe(self, reason: str) -> str:
        return f"file helper of {self.creds.name} (uid {self.creds.uid}, pid {self.pid}) {reason}"

"""The helper process that reads a user's files with that user's rights, and nothing more.

Started as root by ``fs.asuser``: ``python -I -m provenanced.fs.userhelper --uid U --gid G
--groups G,...``. It imports everything first (the code may lie where only root can read),
then drops to the user for good (setgroups, setresgid, setresuid), proves the drop (every id
is the user's, no capability is left, setuid(0) fails) and only then serves framed requests on
stdin/stdout until stdin closes. The kernel marks it non-dumpable after the switch, so the user
can signal it but cannot ptrace it; the daemon treats every reply as untrusted anyway.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

from provenanced.expect.generation import read_generation
from provenanced.fs import wire
from provenanced.fs.facts import FactReader, scan_unit_dir
from provenanced.model import FileFact, HomeManagerGeneration, UnitDir

Handler = Callable[[Mapping[str, Any]], dict[str, Any]]
# Builds a helper's extra operations, given the reader it shares with the built-in ones.
Extension = Callable[[FactReader], Mapping[str, Handler]]

_CAPABILITY_LINES = ("CapPrm:", "CapEff:", "CapAmb:")
# Files and directories the helper creates (quarantine) are the user's alone.
_UMASK = 0o077


class DropError(RuntimeError):
    """The switch to the user's credentials did not take, or could be undone."""


def drop_privileges(uid: int, gid: int, groups: tuple[int, ...]) -> None:
    """Become ``uid``/``gid`` with exactly ``groups``, irrevocably; DropError if any part fails."""
    if (os.getresuid(), os.getresgid(), set(os.getgroups())) != (
        (uid,) * 3,
        (gid,) * 3,
        set(groups),
    ):
        os.setgroups(list(groups))
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    if os.getresuid() != (uid,) * 3 or os.getresgid() != (gid,) * 3:
        raise DropError(f"ids are {os.getresuid()}/{os.getresgid()}, wanted {uid}/{gid}")
    if set(os.getgroups()) != set(groups):
        raise DropError(f"groups are {sorted(os.getgroups())}, wanted {sorted(groups)}")
    if uid == 0:
        return  # root's own manager: reading as root is reading as the user
    try:
        os.setuid(0)
    except PermissionError:
        pass
    else:
        raise DropError("setuid(0) succeeded after the switch")
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(_CAPABILITY_LINES) and int(line.split()[1], 16) != 0:
                raise DropError(f"capabilities left: {line.strip()}")


def _strings(request: Mapping[str, Any], key: str) -> tuple[str, ...]:
    return wire.from_wire(tuple[str, ...], request.get(key), key)


class _Reads:
    """The read operations: facts, directory scans, the Home Manager generation."""

    def __init__(self, reader: FactReader) -> None:
        self.reader = reader
        self._generation: HomeManagerGeneration | None = None

    def facts(self, request: Mapping[str, Any]) -> dict[str, Any]:
        return {"facts": [wire.to_wire(self.reader.read(p)) for p in _strings(request, "paths")]}

    def scan(self, request: Mapping[str, Any]) -> dict[str, Any]:
        dirs = _strings(request, "dirs")
        return {"paths": [path for d in dirs for path in scan_unit_dir(d)]}

    def generation(self, request: Mapping[str, Any]) -> dict[str, Any]:
        home = wire.from_wire(str, request.get("home"), "home")
        unit_dirs = wire.from_wire(tuple[UnitDir, ...], request.get("unit_dirs"), "unit_dirs")
        self._generation = read_generation(home, unit_dirs, self.reader, self._generation)
        return {"generation": wire.to_wire(self._generation)}

    def handlers(self) -> dict[str, Handler]:
        return {"facts": self.facts, "scan": self.scan, "generation": self.generation}


def _read_exact(fd: int, size: int) -> bytes | None:
    """``size`` bytes from ``fd``; None at end of input (the daemon closed the pipe)."""
    chunks = bytearray()
    while len(chunks) < size:
        chunk = os.read(fd, size - len(chunks))
        if not chunk:
            return None
        chunks += chunk
    return bytes(chunks)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _answer(handlers: Mapping[str, Handler], request: Mapping[str, Any]) -> dict[str, Any]:
    handler = handlers.get(request.get("op", ""))
    if handler is None:
        return {"ok": False, "error": f"unknown operation {request.get('op')!r:.40}"}
    try:
        return {"ok": True, **handler(request)}
    except (OSError, ValueError, TypeError, KeyError) as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}


def serve(handlers: Mapping[str, Handler], requests: int, replies: int) -> None:
    """Answer one request frame at a time until the daemon closes ``requests``."""
    while (header := _read_exact(requests, wire.HEADER.size)) is not None:
        body = _read_exact(requests, wire.frame_length(header, wire.REQUEST_MAX))
        if body is None:
            return
        reply = _answer(handlers, wire.decode_body(body))
        try:
            frame = wire.encode_frame(reply, wire.REPLY_MAX)
        except wire.WireError as exc:
            frame = wire.encode_frame({"ok": False, "error": f"reply too large: {exc}"}, 1024)
        _write_all(replies, frame)


def _private_pipes() -> tuple[int, int]:
    """Keep stdin/stdout for frames only: a stray print can no longer corrupt the stream."""
    requests, replies = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.close(devnull)
    return requests, replies


def _warm_up(reader: FactReader) -> None:
    """Load lazily imported code (codecs, type hints) while the interpreter's files are readable.

    After the switch, a root-only install (a venv under /root) cannot be read any more: a codec
    looked up for the first time then fails with LookupError.
    """
    fact = wire.to_wire(reader.read("/"))
    frame = wire.encode_frame({"facts": [fact]}, wire.REPLY_MAX)
    wire.from_wire(tuple[FileFact, ...], wire.decode_body(frame[wire.HEADER.size :])["facts"])
    wire.from_wire(HomeManagerGeneration, wire.to_wire(HomeManagerGeneration()))
    with open("/proc/self/status", encoding="ascii") as status:
        status.read()


def main(argv: list[str], extension: Extension | None = None) -> int:
    """Parse the ids, drop to them, say hello, serve; the exit code is for the daemon's log."""
    parser = argparse.ArgumentParser(prog="provenanced.fs.userhelper")
    parser.add_argument("--uid", type=int, required=True)
    parser.add_argument("--gid", type=int, required=True)
    parser.add_argument("--groups", required=True, help="comma-separated gids")
    args = parser.parse_args(argv)
    groups = tuple(int(g) for g in args.groups.split(",") if g)
    requests, replies = _private_pipes()
    reader = FactReader()
    handlers = _Reads(reader).handlers()
    if extension is not None:
        handlers.update(extension(reader))
    _warm_up(reader)
    try:
        drop_privileges(args.uid, args.gid, groups)
    except (OSError, DropError) as exc:
        _write_all(replies, wire.encode_frame({"ok": False, "error": f"drop: {exc}"}, 4096))
        return 1
    os.umask(_UMASK)
    os.chdir("/")
    _write_all(replies, wire.encode_frame({"ok": True, "pid": os.getpid()}, 4096))
    serve(handlers, requests, replies)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The file operations of GNU coreutils and Nix, replayed syscall for syscall and logged.

Home Manager's activation is a bash script calling `ln`, `rm`, `rmdir`, `mv`, `nix-env` and
`nix-store`; what a watcher sees is what those tools do to the file system, temp names and
renames included. Each function here makes the same system calls in the same order (checked
with `strace` on GNU coreutils 9.1) and appends one `Op` per change to an `OpLog`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import re
import string
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from provenanced.sandbox._proc import SandboxError

# gnulib lib/tempname.c: the letters try_tempname fills a template's X's with.
_TEMP_LETTERS = string.ascii_letters + string.digits
_GENERATION_LINK = re.compile(r"(?P<profile>.+)-(?P<number>\d+)-link")


@dataclass(frozen=True, slots=True)
class Op:
    """One change a replayed tool made, stamped with CLOCK_MONOTONIC (comparable across pids)."""

    at: float
    action: str  # symlink, rename, unlink, rmdir, mkdir, systemctl, phase, note
    path: str
    detail: str = ""
    pid: int = 0


class OpLog:
    """The ordered record of a replay; optionally also appended to a JSON-lines file."""

    def __init__(self, sink: Path | None = None) -> None:
        self.ops: list[Op] = []
        self.sink = sink

    def add(self, action: str, path: Path | str, detail: str = "") -> None:
        """Record one change the moment it is made."""
        op = Op(time.monotonic(), action, str(path), detail, os.getpid())
        self.ops.append(op)
        if self.sink is not None:
            # One O_APPEND write per line: the activation and its caller may share the file.
            fd = os.open(self.sink, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
            try:
                os.write(fd, (json.dumps(asdict(op)) + "\n").encode())
            finally:
                os.close(fd)

    def phase(self, name: str, detail: str = "") -> None:
        """Mark the start of a named activation entry (`linkGeneration`, `reloadSystemd`, …)."""
        self.add("phase", name, detail)


def read_oplog(path: Path) -> list[Op]:
    """Read back what one or more replays appended to a JSON-lines sink."""
    if not path.exists():
        return []
    return [Op(**json.loads(line)) for line in path.read_text().splitlines() if line]


# --- GNU coreutils ----------------------------------------------------------------------------


def _symlink_via_temp(log: OpLog, source: str, link: Path) -> None:
    """gnulib lib/force-link.c force_symlinkat: a `CuXXXXXX` link beside ``link``, renamed over it."""
    while True:
        temp = link.with_name("Cu" + "".join(random.choices(_TEMP_LETTERS, k=6)))
        try:
            os.symlink(source, temp)
        except FileExistsError:
            continue  # try_tempname draws another name
        break
    log.add("symlink", temp, source)
    try:
        os.rename(temp, link)
    except OSError as exc:
        os.unlink(temp)  # force_symlinkat removes its temp link when the rename fails
        log.add("unlink", temp, "rename failed")
        raise SandboxError(f"ln: cannot overwrite {link}: {exc.strerror}") from exc
    log.add("rename", link, f"from {temp.name}")


def ln_force(log: OpLog, source: str, link: Path) -> None:
    """`ln -Tsf SOURCE LINK` (coreutils 9.1): symlinkat first; only on EEXIST temp + rename.

    strace here: `symlinkat("b2", "l") = -1 EEXIST`, `symlinkat("b2", "CuabSwn7")`,
    `renameat("CuabSwn7", "l")`; a new name is a single `symlinkat`.
    """
    try:
        os.symlink(source, link)
    except FileExistsError:
        _symlink_via_temp(log, source, link)
        return
    log.add("symlink", link, source)


def ln_into(log: OpLog, directory: Path, sources: list[str]) -> None:
    """`ln -sfn -t DIR -- SOURCE…`: one link per source named after its basename, each forced."""
    for source in sources:
        ln_force(log, source, directory / os.path.basename(source))


def mkdir_p(log: OpLog, directory: Path) -> None:
    """`mkdir -p`: create each missing component, outermost first."""
    missing = []
    for path in (directory, *directory.parents):
        if path.is_dir():
            break
        missing.append(path)
    for path in reversed(missing):
        with contextlib.suppress(FileExistsError):
            path.mkdir()
            log.add("mkdir", path)


def rm(log: OpLog, path: Path, *, force: bool = False) -> None:
    """`rm [-f] PATH`: unlink (a symlink itself, never its target)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        if not force:
            raise
        return
    log.add("unlink", path)


def rmdir_parents(log: OpLog, home: Path, relative_dir: str) -> None:
    """`cd $HOME; rmdir -p --ignore-fail-on-non-empty DIR`: stop quietly at a non-empty one."""
    current = relative_dir
    while current not in ("", "."):
        try:
            os.rmdir(home / current)
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                return
            raise SandboxError(f"rmdir: failed to remove {home / current}: {exc.strerror}") from exc
        log.add("rmdir", home / current)
        current = os.path.dirname(current)


def mv_noreplace(log: OpLog, source: Path, target: Path) -> None:
    """`mv SOURCE TARGET` onto a free name (coreutils 9.1: renameat2 RENAME_NOREPLACE)."""
    if os.path.lexists(target):
        raise SandboxError(f"mv: {target} exists")
    os.rename(source, target)
    log.add("rename", target, f"from {source}")


# --- Nix ---------------------------------------------------------------------------------------


def nix_make_symlink(log: OpLog, link: Path, target: str) -> None:
    """Nix src/libstore/indirect-root-store.cc makeSymlink: `LINK.tmp-PID-RAND`, then rename."""
    link.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(f"{link}.tmp-{os.getpid()}-{random.randrange(1 << 31)}")
    os.symlink(target, temp)
    log.add("symlink", temp, target)
    os.rename(temp, link)
    log.add("rename", link, f"from {temp.name}")


def nix_replace_symlink(log: OpLog, link: Path, target: str) -> None:
    """Nix libutil replaceSymlink: the first free `.N_NAME` beside the link, then rename."""
    for n in range(1 << 16):
        temp = link.with_name(f".{n}_{link.name}")
        try:
            os.symlink(target, temp)
        except FileExistsError:
            continue
        log.add("symlink", temp, target)
        os.rename(temp, link)
        log.add("rename", link, f"from {temp.name}")
        return
    raise SandboxError(f"no free temp name beside {link}")


def _gcroots_auto(store: Path) -> Path:
    """`$NIX_STATE_DIR/gcroots/auto` of the fake store (`<root>/nix/var/nix` beside `nix/store`)."""
    return store.parent / "var/nix/gcroots/auto"


def nix_add_root(log: OpLog, store: Path, root: Path, store_path: Path) -> None:
    """`nix-store --realise PATH --add-root ROOT`: addPermRoot = makeSymlink + addIndirectRoot."""
    # indirect-root-store.cc addPermRoot: never clobber something that is not a store link.
    if os.path.lexists(root) and not (
        root.is_symlink() and Path(os.readlink(root)).is_relative_to(store)
    ):
        raise SandboxError(f"cannot create symlink {root}; already exists")
    nix_make_symlink(log, root, str(store_path))
    digest = hashlib.sha1(str(root).encode()).hexdigest()
    nix_make_symlink(log, _gcroots_auto(store) / digest, str(root))


def nix_env_set(log: OpLog, store: Path, profile: Path, store_path: Path) -> None:
    """`nix-env --profile PROFILE --set PATH` (src/libstore/profiles.cc).

    createGeneration reuses the newest `PROFILE-N-link` when it already holds PATH, else adds
    `PROFILE-(N+1)-link` as a permanent root; switchLink then always replaces PROFILE itself with
    a relative link through replaceSymlink.
    """
    numbers = []
    for entry in profile.parent.iterdir():
        match = _GENERATION_LINK.fullmatch(entry.name)
        if match and match.group("profile") == profile.name:
            numbers.append(int(match.group("number")))
    newest = max(numbers, default=0)
    generation = profile.with_name(f"{profile.name}-{newest}-link")
    if not numbers or Path(os.readlink(generation)) != store_path:
        generation = profile.with_name(f"{profile.name}-{newest + 1}-link")
        nix_add_root(log, store, generation, store_path)
    nix_replace_symlink(log, profile, generation.name)

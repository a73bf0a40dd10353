"""Heal: put Home Manager's expected link back, after moving whatever was there into quarantine."""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import secrets
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from provenanced.config import HEALABLE, PolicySettings
from provenanced.core.unitpath import USER_TIERS, locate
from provenanced.fs import atomic
from provenanced.fs.facts import FactReader
from provenanced.model import ExpectedLink, FileFact, FileKind, Finding, UnitDir


@dataclass(frozen=True, slots=True)
class HealOutcome:
    """What one heal attempt did."""

    ok: bool
    detail: str
    quarantined: str | None = None


class HealError(Exception):
    """A heal precondition failed; nothing was touched."""


class Healer:
    """Puts Home Manager's expected link back, after moving whatever was there into quarantine."""

    def __init__(self, state_dir: str, home: str) -> None:
        self.quarantine_root = posixpath.join(state_dir, "quarantine")
        self.home = home
        self._reader = FactReader()

    @staticmethod
    def wants(finding: Finding, policy: PolicySettings) -> bool:
        """Whether policy opts this finding's kind into healing."""
        return finding.kind in HEALABLE and policy.heal.get(finding.kind) == "heal"

    def heal(
        self,
        finding: Finding,
        examined: FileFact | None,
        expected: ExpectedLink | None,
        unit_dirs: Iterable[UnitDir],
    ) -> HealOutcome:
        """Quarantine the current file (if any) and place the expected link; abort untouched on doubt."""
        quarantined: str | None = None
        try:
            self._check(finding.path, examined, expected, unit_dirs)
            assert expected is not None and examined is not None
            quarantined = (
                self._quarantine(finding, examined)
                if examined.kind is not FileKind.MISSING
                else None
            )
            directory, name = posixpath.split(finding.path)
            # The path is empty now; whatever lands there meanwhile is someone's and must stay.
            atomic.create_symlink(directory, name, expected.target)
        except FileExistsError:
            kept = f"; the examined file is in {quarantined}" if quarantined else ""
            return HealOutcome(
                False, f"not healed: {finding.path} was written again while healing{kept}"
            )
        except HealError as exc:
            return HealOutcome(False, f"not healed: {exc}")
        except OSError as exc:
            return HealOutcome(False, f"not healed: {exc.strerror or exc} ({finding.path})")
        moved = f"moved the old file to {quarantined}; " if quarantined else ""
        return HealOutcome(True, f"{moved}linked {finding.path} -> {expected.target}", quarantined)

    def _check(
        self,
        path: str,
        examined: FileFact | None,
        expected: ExpectedLink | None,
        unit_dirs: Iterable[UnitDir],
    ) -> None:
        if expected is None:
            raise HealError("only links Home Manager's current generation places can be healed")
        if examined is None:
            raise HealError("the file was never examined")
        if not os.path.exists(expected.target):
            raise HealError(f"the expected target {expected.target} does not exist")
        loc = locate(path, {d.path: d for d in unit_dirs})
        if loc is None or loc.unit_dir.tier not in USER_TIERS:
            raise HealError(f"{path} is not inside a user unit directory")
        parent = posixpath.dirname(path)
        if os.path.realpath(parent) != parent:
            raise HealError(f"a parent of {path} is a symlink; refusing to write through it")
        current = self._reader.read(path)
        if (current.kind, current.inode, current.mtime_ns, current.sha256, current.target) != (
            examined.kind,
            examined.inode,
            examined.mtime_ns,
            examined.sha256,
            examined.target,
        ):
            raise HealError(f"{path} changed since it was examined")

    def _quarantine(self, finding: Finding, examined: FileFact) -> str:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        relative = posixpath.relpath(finding.path, self.home)
        if relative.startswith(".."):
            relative = finding.path.lstrip("/")
        destination = posixpath.join(self.quarantine_root, stamp, relative)
        q_dir, q_name = posixpath.split(destination)
        os.makedirs(q_dir, mode=0o700, exist_ok=True)
        directory, name = posixpath.split(finding.path)
        with atomic.open_dir(directory) as src_fd, atomic.open_dir(q_dir) as dst_fd:
            try:
                os.rename(name, q_name, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
            except OSError as exc:
                if exc.errno != 18:  # EXDEV: the state dir is on another file system
                    raise
                _move_across(src_fd, name, dst_fd, q_name, examined)
            os.fsync(dst_fd)
        sidecar = {
            "original_path": finding.path,
            "kind": examined.kind.value,
            "sha256": examined.sha256,
            "mode": oct(examined.mode) if examined.mode is not None else None,
            "uid": examined.uid,
            "target": examined.target,
            "reason": f"{finding.kind.value}: {finding.detail}",
            "quarantined_at": time.time(),
        }
        atomic.write_file(
            q_dir, f"{q_name}.provenanced.json", json.dumps(sidecar, indent=1).encode()
        )
        return destination


def _move_across(src_fd: int, name: str, dst_fd: int, q_name: str, examined: FileFact) -> None:
    """Quarantine across file systems without ever unlinking a file saved meanwhile.

    The file is first renamed aside in its own directory (atomic), so only the examined inode is
    copied and unlinked; a version written at ``name`` during the copy is left alone.
    """
    aside = f".{name}.{secrets.token_hex(6)}.quarantine"
    os.rename(name, aside, src_dir_fd=src_fd, dst_dir_fd=src_fd)
    try:
        _copy_then_unlink(src_fd, aside, dst_fd, q_name, examined)
    except BaseException:
        # Put it back unless something took its place; then it stays aside, intact and visible.
        with contextlib.suppress(OSError):
            os.link(aside, name, src_dir_fd=src_fd, dst_dir_fd=src_fd, follow_symlinks=False)
            os.unlink(aside, dir_fd=src_fd)
        raise


def _copy_then_unlink(src_fd: int, name: str, dst_fd: int, q_name: str, examined: FileFact) -> None:
    """Cross-device move: the copy is durable in quarantine before the original goes."""
    st = os.lstat(name, dir_fd=src_fd)
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(name, dir_fd=src_fd), q_name, dir_fd=dst_fd)
    else:
        src = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=src_fd)
        try:
            dst = os.open(
                q_name,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
                dir_fd=dst_fd,
            )
            try:
                while chunk := os.read(src, 1 << 16):
                    while chunk:  # os.write may write less than asked
                        chunk = chunk[os.write(dst, chunk) :]
                os.fsync(dst)
            except OSError:
                # A partial copy (ENOSPC, EIO) must not sit in quarantine posing as the file.
                with contextlib.suppress(OSError):
                    os.unlink(q_name, dir_fd=dst_fd)
                raise
            finally:
                os.close(dst)
        finally:
            os.close(src)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=src_fd)

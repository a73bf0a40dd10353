"""Heal: put Home Manager's expected link back, after moving whatever was there into quarantine."""

from __future__ import annotations

import json
import os
import posixpath
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from provenanced.config import HEALABLE, PolicySettings
from provenanced.core.unitpath import USER_TIERS, locate
from provenanced.fs import atomic, quarantine
from provenanced.fs.facts import FactReader
from provenanced.model import ExpectedLink, FileFact, FileKind, Finding, UnitDir


@dataclass(frozen=True, slots=True)
class HealOutcome:
    """What one heal attempt did; with ``retry_in`` set it was deferred, nothing touched."""

    ok: bool
    detail: str
    quarantined: str | None = None
    retry_in: float | None = None


class HealError(Exception):
    """A heal precondition failed; nothing was touched."""


class HealDeferred(HealError):
    """The file is not quiet yet (someone writes it, or it just changed); nothing was touched."""

    def __init__(self, reason: str, retry_in: float) -> None:
        super().__init__(reason)
        self.retry_in = retry_in


# A file someone holds open for writing is looked at again this often, at the most.
_WRITER_RECHECK = 0.5

_Stamp = tuple[int, int, int, int]


class Healer:
    """Puts Home Manager's expected link back, after moving whatever was there into quarantine."""

    def __init__(self, state_dir: str, home: str) -> None:
        self.state_dir = posixpath.normpath(state_dir)
        self.quarantine_root = posixpath.join(self.state_dir, "quarantine")
        self.home = home
        self._reader = FactReader()
        # path -> (its stat stamp, when first seen so): quiet is measured even if the clock jumps.
        self._sightings: dict[str, tuple[_Stamp, float]] = {}

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
        quiet_window: float = 0.0,
    ) -> HealOutcome:
        """Quarantine the current file (if any) and place the expected link; abort untouched on doubt.

        A file someone holds open for writing, or that changed within ``quiet_window`` seconds,
        is left alone and the outcome says when to try again.
        """
        outcome = self._attempt(finding, examined, expected, unit_dirs, quiet_window)
        if outcome.retry_in is None:
            self._sightings.pop(finding.path, None)
        return outcome

    def _attempt(
        self,
        finding: Finding,
        examined: FileFact | None,
        expected: ExpectedLink | None,
        unit_dirs: Iterable[UnitDir],
        quiet_window: float,
    ) -> HealOutcome:
        quarantined: str | None = None
        try:
            self._check(finding.path, examined, expected, unit_dirs)
            assert expected is not None and examined is not None
            self._wait_for_quiet(finding.path, quiet_window)
            self._check_unchanged(finding.path, examined)
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
        except HealDeferred as exc:
            return HealOutcome(False, f"deferred: {exc}", retry_in=exc.retry_in)
        except quarantine.BusyError as exc:
            # Someone wrote or opened it while it was being moved; it is back in place.
            return HealOutcome(
                False, f"deferred: {exc}", retry_in=max(quiet_window, _WRITER_RECHECK)
            )
        except (HealError, quarantine.QuarantineError) as exc:
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

    def _wait_for_quiet(self, path: str, window: float) -> None:
        """Defer while anyone has ``path`` open for writing or it changed in the last ``window`` s."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return  # nothing there to be written; the identity check says whether that is news
        quiet = self._quiet_for(path, st)
        if quiet < window:
            raise HealDeferred(
                f"{path} changed {quiet:.1f}s ago; waiting for {window:g}s without changes",
                window - quiet,
            )
        if stat.S_ISREG(st.st_mode) and quarantine.being_written(path, st.st_ino):
            raise HealDeferred(f"{path} is open for writing", max(window, _WRITER_RECHECK))

    def _quiet_for(self, path: str, st: os.stat_result) -> float:
        """Seconds ``path`` has not changed: by its ctime, or since we first saw it as it is."""
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        now = time.monotonic()
        seen = self._sightings.get(path)
        if seen is None or seen[0] != stamp:
            seen = self._sightings[path] = (stamp, now)
        # The kernel sets ctime on every write, truncate, chmod or rename, and nobody can set it
        # back; a clock stepped backwards makes it look young, and our first sighting bounds that.
        return max(time.time() - st.st_ctime_ns / 1e9, now - seen[1])

    def _check_unchanged(self, path: str, examined: FileFact) -> None:
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
        """Move the examined file into quarantine, verified and durable, and write its sidecar."""
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        relative = posixpath.relpath(finding.path, self.home)
        if relative.startswith(".."):
            relative = finding.path.lstrip("/")
        destination = posixpath.join(self.quarantine_root, stamp, relative)
        sha256 = quarantine.move_into(finding.path, destination, examined, self.state_dir)
        sidecar = {
            "original_path": finding.path,
            "kind": examined.kind.value,
            "sha256": sha256,
            "mode": oct(examined.mode) if examined.mode is not None else None,
            "uid": examined.uid,
            "target": examined.target,
            "reason": f"{finding.kind.value}: {finding.detail}",
            "quarantined_at": time.time(),
        }
        q_dir, q_name = posixpath.split(destination)
        atomic.write_file(
            q_dir, f"{q_name}.provenanced.json", json.dumps(sidecar, indent=1).encode()
        )
        return destination

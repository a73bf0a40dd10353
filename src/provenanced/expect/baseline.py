"""The accepted baseline: what the unit files were when the user last said "this is fine"."""

from __future__ import annotations

import json
import os
import posixpath
import time
from collections.abc import Callable, Iterable, Mapping

import structlog

from provenanced.core.vouching import is_home_manager_link
from provenanced.errors import StateError
from provenanced.fs import atomic
from provenanced.model import BaselineEntry, FileFact, FileKind

log = structlog.get_logger("provenanced.baseline")

BASELINE_FILE = "baseline.json"
_VERSION = 1


def baseline_stamp(state_dir: str) -> tuple[int, int, int, int] | None:
    """What tells one version of the baseline file from the next (None when there is none)."""
    try:
        st = os.stat(posixpath.join(state_dir, BASELINE_FILE))
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def load_baseline(state_dir: str) -> dict[str, BaselineEntry] | None:
    """The recorded baseline, or ``None`` when none has been accepted yet."""
    path = posixpath.join(state_dir, BASELINE_FILE)
    try:
        with open(path, encoding="utf-8") as handle:
            document = json.load(handle)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise StateError(f"cannot read baseline {path}: {exc}") from exc
    try:
        return {
            path: BaselineEntry(
                path,
                FileKind(entry["kind"]),
                entry.get("target"),
                entry.get("resolved"),
                entry.get("sha256"),
            )
            for path, entry in document["entries"].items()
        }
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise StateError(
            f"baseline {path} is malformed ({exc}); run 'provenanced baseline accept'"
        ) from exc


def entries_from_facts(facts: Iterable[FileFact]) -> dict[str, BaselineEntry]:
    """Baseline entries for every existing file among ``facts`` but Home Manager's links."""
    return {
        fact.path: BaselineEntry(fact.path, fact.kind, fact.target, fact.resolved, fact.sha256)
        for fact in facts
        if fact.kind is FileKind.FILE
        # Home Manager is the authority for its links: its generation, not the baseline, expects them.
        or (fact.kind is FileKind.SYMLINK and not is_home_manager_link(fact.target))
    }


def save_baseline(state_dir: str, entries: Mapping[str, BaselineEntry]) -> str:
    """Write the baseline atomically; the previous one stays intact if anything fails."""
    document = {
        "version": _VERSION,
        "accepted_at": time.time(),
        "entries": {
            path: {
                "kind": e.kind.value,
                "target": e.target,
                "resolved": e.resolved,
                "sha256": e.sha256,
            }
            for path, e in sorted(entries.items())
        },
    }
    data = json.dumps(document, indent=1, ensure_ascii=False).encode("utf-8", "surrogateescape")
    try:
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        atomic.write_file(state_dir, BASELINE_FILE, data)
    except OSError as exc:
        raise StateError(f"cannot write baseline in {state_dir}: {exc.strerror or exc}") from exc
    return posixpath.join(state_dir, BASELINE_FILE)


class BaselineFile:
    """One state directory's baseline, read again only when the file changed.

    A first read with no file records one from ``first`` (what is there now is what the user
    accepts, so later changes stand out).
    """

    def __init__(self, state_dir: str) -> None:
        self.state_dir = state_dir
        self._stamp: tuple[int, int, int, int] | None = None

    def read_if_changed(
        self, first: Callable[[], Iterable[FileFact]]
    ) -> Mapping[str, BaselineEntry] | None:
        """The baseline when it changed since the last read (recorded when absent), else None."""
        stamp = baseline_stamp(self.state_dir)
        if stamp is not None and stamp == self._stamp:
            return None  # unchanged: keep it, and the expectations built on it
        try:
            accepted = load_baseline(self.state_dir)
        except StateError as exc:
            log.error("baseline.unreadable", error=str(exc))
            return None
        if accepted is None:
            accepted = entries_from_facts(first())
            try:
                path = save_baseline(self.state_dir, accepted)
                log.info("baseline.recorded", path=path, files=len(accepted))
            except StateError as exc:
                log.error("baseline.unwritable", error=str(exc))
        # Stamped before the read, so a write racing it is read again next time.
        self._stamp = stamp or baseline_stamp(self.state_dir)
        return accepted

"""Read the daemon's drift entries back from journald, with journald's own receive timestamps."""

from __future__ import annotations

import datetime
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from systemd import journal

from provenanced.sinks.journal import DRIFT_DETECTED, DRIFT_RESOLVED

_POLL = 0.001


@dataclass(frozen=True, slots=True)
class Entry:
    """One drift entry: what, where, when journald wrote it (CLOCK_MONOTONIC) and when it was sent.

    ``source_realtime`` is the kernel's receive stamp on the datagram
    (``_SOURCE_REALTIME_TIMESTAMP``, CLOCK_REALTIME): when the daemon handed the entry over.
    """

    message_id: str
    kind: str
    path: str
    unit: str
    monotonic: float
    source_realtime: float | None


class JournalWatch:
    """Follows one daemon pid's entries (drift detected and resolved by default) from now on.

    Both timestamps are taken by the kernel and journald, so they do not depend on when we read.
    """

    def __init__(
        self, pid: int, message_ids: Sequence[str] = (DRIFT_DETECTED, DRIFT_RESOLVED)
    ) -> None:
        self._reader = journal.Reader(
            converters={
                "__MONOTONIC_TIMESTAMP": lambda m: m[0],
                "_SOURCE_REALTIME_TIMESTAMP": int,
            }
        )
        for message_id in message_ids:
            self._reader.add_match(MESSAGE_ID=message_id)
        self._reader.add_match(_PID=str(pid))
        self._reader.this_boot()
        # Sets up the inotify watch: without it process() never learns that journald rotated to
        # a new file, and entries written there stay invisible until something calls wait().
        self._reader.fileno()
        # Not seek_tail(): with no matching entry yet, the first next() after it jumps to the
        # tail as it is *then*, skipping everything written in between.
        self._reader.seek_realtime(datetime.datetime.now() - datetime.timedelta(seconds=1))
        self.entries: list[Entry] = []

    def close(self) -> None:
        """Release the journal files."""
        self._reader.close()

    def wait_for(
        self, message_id: str, kind: str, path: str, after: float, timeout: float
    ) -> Entry | None:
        """Read until an entry of this id, kind and path written at or after ``after`` shows up."""
        deadline = time.monotonic() + timeout
        while True:
            # Picks up journal files journald rotated to (their creation is signalled at once).
            self._reader.process()
            for raw in self._reader:
                self.entries.append(_entry(raw))
            found = find(self.entries, message_id, kind, path, after)
            if found is not None or time.monotonic() >= deadline:
                return found
            # Not wait(): journald signals readers through inotify only after a 250 ms timer
            # (JOURNAL_FILE_POST_CHANGE_TIMER), while the mapped file shows new entries at once.
            time.sleep(_POLL)

    def drain(self, settle: float = 0.5) -> list[Entry]:
        """Read everything new; wait up to ``settle`` seconds for entries after the last one."""
        deadline = time.monotonic() + settle
        while True:
            got = False
            for raw in self._reader:
                self.entries.append(_entry(raw))
                got = True
            if got:
                deadline = time.monotonic() + settle
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return self.entries
            self._reader.wait(remaining)


def find(entries: list[Entry], message_id: str, kind: str, path: str, after: float) -> Entry | None:
    """The first entry of this id, kind and path journald wrote at or after ``after``."""
    for e in entries:
        if (
            e.message_id == message_id
            and e.kind == kind
            and e.path == path
            and e.monotonic >= after
        ):
            return e
    return None


def _entry(raw: dict[str, Any]) -> Entry:
    source = raw.get("_SOURCE_REALTIME_TIMESTAMP")
    return Entry(
        message_id=str(raw.get("MESSAGE_ID", "")).replace("-", ""),
        kind=str(raw.get("PROVENANCED_KIND", "")),
        path=str(raw.get("PROVENANCED_PATH", "")),
        unit=str(raw.get("USER_UNIT", "")),
        monotonic=int(raw["__MONOTONIC_TIMESTAMP"]) / 1e6,
        source_realtime=int(source) / 1e6 if source else None,
    )

"""Inject file changes into the unit tree and time how long until the daemon reports them.

Three kinds, each undone right after it was seen so the tree (and the open findings) return to
their steady state and every change is measured against the same daemon state:

- ``link-replaced``: a Home Manager fragment link becomes a regular file with the same content
  (what `cp --remove-destination "$(readlink -f f)" f` leaves), renamed into place atomically;
- ``fragment-edited``: a hand-written fragment gets a line appended in place, as an editor
  writing through the file does; undone by renaming the original back with its mtime, so
  systemd's NeedDaemonReload goes back to "no" as well;
- ``dropin-added``: a new regular-file drop-in in a unit's ``.d`` directory, written in place.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from bench.daemonproc import DaemonProcess
from bench.journalwatch import Entry, JournalWatch, find
from bench.tree import Tree
from provenanced.sinks.journal import DRIFT_DETECTED, DRIFT_RESOLVED

ChangeKind = Literal["link-replaced", "fragment-edited", "dropin-added"]
KINDS: tuple[ChangeKind, ...] = ("link-replaced", "fragment-edited", "dropin-added")
# The finding each change must produce (fragment edits of a baseline-accepted file).
FINDING: dict[ChangeKind, str] = {
    "link-replaced": "link-replaced",
    "fragment-edited": "unmanaged-unit",
    "dropin-added": "unmanaged-dropin",
}
_DROPIN_NAME = "90-bench-override.conf"
_DROPIN_TEXT = b"[Service]\nEnvironment=BENCH_OVERRIDE=1\n"
_EDIT = b"# edited in place by the benchmark\n"
_TIMEOUT = 10.0
_SETTLE_POLLS = 2
_MIN_CHANGES = 30
# Past this the /metrics poll starts anyway, to restore the steady state before the next change.
_WAIT = 0.5
_RSS_EVERY = 30


@dataclass(slots=True)
class Change:
    """One file operation, how to undo it, and the finding it must open."""

    kind: ChangeKind
    path: Path
    unit: str
    scratch: Path
    _undo: Callable[[], None] | None = None

    def shown(self, body: bytes) -> bool:
        """Whether a /metrics body holds this change's finding (label order is the encoder's)."""
        return has_finding(body, FINDING[self.kind], str(self.path))

    def apply(self) -> tuple[float, float]:
        """Make the change; (perf_counter, CLOCK_MONOTONIC) read just before the visible syscall."""
        if self.kind == "link-replaced":
            content = self.path.read_bytes()
            target = os.readlink(self.path)
            tmp = self.scratch / f"{self.path.name}.file"
            tmp.write_bytes(content)
            stamp = _now()
            os.replace(tmp, self.path)
            self._undo = lambda: _place_link(self.scratch, self.path, target)
        elif self.kind == "fragment-edited":
            original = self.path.read_bytes()
            st = os.stat(self.path)
            stamp = _now()
            with self.path.open("ab") as handle:
                handle.write(_EDIT)
            self._undo = lambda: _restore_file(self.scratch, self.path, original, st)
        else:
            stamp = _now()
            with self.path.open("xb") as handle:
                handle.write(_DROPIN_TEXT)
            self._undo = self.path.unlink
        return stamp

    def revert(self) -> tuple[float, float]:
        """Undo the change; returns the same pair of clocks as apply()."""
        assert self._undo is not None
        stamp = _now()
        self._undo()
        self._undo = None
        return stamp


def has_finding(body: bytes, kind: str, path: str) -> bool:
    """A ``provenanced_finding`` series with this kind and path is in the exposition."""
    path_label, kind_label = f'path="{path}"'.encode(), f'kind="{kind}"'.encode()
    start = body.find(path_label)
    while start >= 0:
        line_start = body.rfind(b"\n", 0, start) + 1
        line_end = body.find(b"\n", start)
        line = body[line_start : line_end if line_end >= 0 else len(body)]
        if line.startswith(b"provenanced_finding{") and kind_label in line:
            return True
        start = body.find(path_label, start + 1)
    return False


def _now() -> tuple[float, float]:
    return time.perf_counter(), time.monotonic()


def _place_link(scratch: Path, path: Path, target: str) -> None:
    tmp = scratch / f"{path.name}.link"
    tmp.symlink_to(target)
    os.replace(tmp, path)


def _restore_file(scratch: Path, path: Path, content: bytes, st: os.stat_result) -> None:
    tmp = scratch / f"{path.name}.orig"
    tmp.write_bytes(content)
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(tmp, path)


def plan_changes(tree: Tree, count: int, scratch: Path) -> list[Change]:
    """``count`` changes, the three kinds interleaved, each kind cycling over its own targets."""
    scratch.mkdir(parents=True, exist_ok=True)
    pools: dict[ChangeKind, Iterator[Change]] = {
        "link-replaced": itertools.cycle(
            [Change("link-replaced", p, p.name, scratch) for p in tree.hm_fragments]
        ),
        "fragment-edited": itertools.cycle(
            [Change("fragment-edited", p, p.name, scratch) for p in tree.plain_fragments]
        ),
        "dropin-added": itertools.cycle(
            [
                Change("dropin-added", d / _DROPIN_NAME, d.name.removesuffix(".d"), scratch)
                for d in tree.dropin_dirs
            ]
        ),
    }
    # Spread over the tree rather than always the first few units.
    stride = 7
    for pool in pools.values():
        for _ in range(stride):
            next(pool)
    return [next(pools[KINDS[i % len(KINDS)]]) for i in range(count)]


@dataclass(slots=True)
class Sample:
    """The timings of one change, in seconds; None where the daemon never showed it."""

    kind: ChangeKind
    to_metrics: float | None = None
    to_journal: float | None = None
    resolved_metrics: float | None = None
    resolved_journal: float | None = None
    t_apply: float = 0.0
    t_revert: float = 0.0
    path: str = ""
    poll_late: float | None = None  # CLOCK_MONOTONIC when /metrics polling began without the entry
    undo_poll_late: float | None = None


@dataclass(slots=True)
class Batch:
    """Every change of one run, the daemon's CPU spent on them and what its own histogram says."""

    samples: list[Sample] = field(default_factory=list)
    cpu_seconds: float = 0.0
    wall_seconds: float = 0.0
    scrapes: int = 0
    internal_mean: float | None = None
    missed: int = 0
    journal_missing: int = 0
    journal_late: int = 0  # /metrics figures left out because our journal reader lagged
    rss: list[tuple[int, int]] = field(default_factory=list)  # (changes done, RSS bytes)


def _poll(
    daemon: DaemonProcess, seen: Callable[[bytes], bool], interval: float
) -> tuple[float | None, int]:
    """Scrape until ``seen(body)``: when that response's first byte came, and scrapes used.

    The collector renders the whole exposition before the first byte goes out, so the first
    byte bounds from above the moment the snapshot holding the finding was read.
    """
    deadline = time.perf_counter() + _TIMEOUT
    scrapes = 0
    while time.perf_counter() < deadline:
        response = daemon.scrape()
        scrapes += 1
        if seen(response.body):
            return response.first_byte, scrapes
        time.sleep(interval)
    return None, scrapes


def _settle(daemon: DaemonProcess, interval: float) -> None:
    """Wait until the daemon stops reconciling (its detection histogram count stops moving)."""
    name = "provenanced_detection_latency_seconds_count"
    last, stable = daemon.metrics().get(name), 0
    deadline = time.perf_counter() + _TIMEOUT
    while stable < _SETTLE_POLLS and time.perf_counter() < deadline:
        time.sleep(interval)
        now = daemon.metrics().get(name)
        stable = stable + 1 if now == last else 0
        last = now


def run_changes(
    daemon: DaemonProcess, changes: list[Change], poll_interval: float, budget: float = math.inf
) -> Batch:
    """Apply, wait for the finding, revert, wait for it to go; each time in journald, then /metrics.

    The journal is read first because reading it costs the daemon nothing, while every /metrics
    poll makes its HTTP thread take the GIL from the event loop being measured (at a 2 ms poll,
    a quarter of the daemon's samples were scrapes). The daemon sends the journal entry and
    publishes the /metrics snapshot in one synchronous step, so /metrics is then polled until it
    shows the change, usually on the first scrape; if the journal stays silent, /metrics is polled
    from the start. Stops early, after at least 30 changes, once ``budget`` seconds are spent.
    """
    batch = Batch()
    watch = JournalWatch(daemon.pid)
    _settle(daemon, 0.02)
    internal_before = daemon.metrics()
    first = daemon.proc()
    cpu_before = first.cpu_seconds
    batch.rss.append((0, first.rss_bytes))
    started = time.perf_counter()
    try:
        for change in changes:
            if len(batch.samples) >= _MIN_CHANGES and time.perf_counter() - started > budget:
                break
            sample = Sample(change.kind, path=str(change.path))
            kind = FINDING[change.kind]
            t_perf, sample.t_apply = change.apply()
            if watch.wait_for(DRIFT_DETECTED, kind, sample.path, sample.t_apply, _WAIT) is None:
                sample.poll_late = time.monotonic()
            visible, used = _poll(daemon, change.shown, poll_interval)
            batch.scrapes += used
            sample.to_metrics = None if visible is None else visible - t_perf
            t_perf, sample.t_revert = change.revert()
            if watch.wait_for(DRIFT_RESOLVED, kind, sample.path, sample.t_revert, _WAIT) is None:
                sample.undo_poll_late = time.monotonic()
            gone, used = _poll(daemon, lambda b, c=change: not c.shown(b), poll_interval)
            batch.scrapes += used
            sample.resolved_metrics = None if gone is None else gone - t_perf
            if visible is None or gone is None:
                batch.missed += 1  # the daemon never showed it within _TIMEOUT
            batch.samples.append(sample)
            _settle(daemon, 0.01)
            if len(batch.samples) % _RSS_EVERY == 0:
                batch.rss.append((len(batch.samples), daemon.proc().rss_bytes))
        batch.wall_seconds = time.perf_counter() - started
        batch.cpu_seconds = daemon.proc().cpu_seconds - cpu_before
        internal_after = daemon.metrics()
        entries = watch.drain()
    finally:
        watch.close()
    _match_journal(batch, entries)
    name = "provenanced_detection_latency_seconds"
    count = internal_after.get(f"{name}_count", 0.0) - internal_before.get(f"{name}_count", 0.0)
    total = internal_after.get(f"{name}_sum", 0.0) - internal_before.get(f"{name}_sum", 0.0)
    batch.internal_mean = total / count if count else None
    return batch


def _match_journal(batch: Batch, entries: list[Entry]) -> None:
    """Pair each change with the first matching entry journald wrote after the file operation.

    When our reader had not seen an entry within _WAIT and polling started late, the /metrics
    figure is kept only if journald wrote the entry after polling began (the daemon was slow, and
    the poll caught it); otherwise it would time our reader, not the daemon, and is left out.
    """
    for sample in batch.samples:
        kind = FINDING[sample.kind]
        detected = find(entries, DRIFT_DETECTED, kind, sample.path, sample.t_apply)
        resolved = find(entries, DRIFT_RESOLVED, kind, sample.path, sample.t_revert)
        sample.to_journal = None if detected is None else detected.monotonic - sample.t_apply
        sample.resolved_journal = None if resolved is None else resolved.monotonic - sample.t_revert
        if detected is None:
            batch.journal_missing += 1
        if _reader_lagged(sample.poll_late, detected):
            sample.to_metrics = None
            batch.journal_late += 1
        if _reader_lagged(sample.undo_poll_late, resolved):
            sample.resolved_metrics = None
            batch.journal_late += 1


def _reader_lagged(poll_from: float | None, entry: Entry | None) -> bool:
    return poll_from is not None and (entry is None or entry.monotonic < poll_from)

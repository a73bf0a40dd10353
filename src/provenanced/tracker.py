"""What the daemon knows: the last observation, kept current by full and partial re-reads, judged."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace

from provenanced.audit import definition_hash
from provenanced.expect.homemanager import Generation
from provenanced.incremental import IncrementalAudit
from provenanced.index import PathIndex
from provenanced.model import (
    BaselineEntry,
    Expectations,
    FileKind,
    Finding,
    Observation,
    frozen_map,
)
from provenanced.observe import Observer
from provenanced.systemd import manager
from provenanced.systemd.names import could_define_unit
from provenanced.unitpath import AUDITED_TIERS, locate

# What a partial re-read changed: the paths (facts or scan) and the units (records or hashes).
Changed = tuple[Iterable[str], Iterable[str]]


class FullResyncNeeded(Exception):
    """A change a partial re-read cannot cover (a unit directory itself changed)."""


class Tracker:
    """The observation with its indexes, the expectations, and the audit that follows both.

    A full re-read replaces everything; a partial one re-reads the changed paths and the units
    they can affect, and only those are judged again.
    """

    def __init__(self) -> None:
        self.observer: Observer | None = None  # set on every connect
        self.obs: Observation | None = None  # the last one judged
        self.generation = Generation(None, None, {})
        self._baseline: Mapping[str, BaselineEntry] = {}
        self._exp: Expectations | None = None  # built once per generation and baseline
        self._index = PathIndex()
        self._loaded_hashes: dict[str, str] = {}
        self._audit: IncrementalAudit | None = None

    def _observer(self) -> Observer:
        assert self.observer is not None, "no connection to the manager yet"
        return self.observer

    def expectations(self) -> Expectations:
        """What vouches for files right now."""
        if self._exp is None:
            self._exp = self._observer().expectations(self.generation, self._baseline)
        return self._exp

    def accept_baseline(self, accepted: Mapping[str, BaselineEntry]) -> None:
        """The baseline files are judged against from now on."""
        self._baseline, self._exp = accepted, None

    def forget_generation(self) -> None:
        """Read the Home Manager generation again on the next full re-read (config changed)."""
        self._exp, self.generation = None, Generation(None, None, {})

    async def read_all(self, reference: bool) -> Observation:
        """Re-read the manager and every audited file; ``reference``: the manager just loaded."""
        obs, generation = await self._observer().observe(
            loaded_hashes=self._loaded_hashes, known_generation=self.generation
        )
        if generation is not self.generation:
            self.generation, self._exp = generation, None
        self._index = PathIndex.build(obs.units.values())
        if reference:
            # What the manager just loaded is the reference the mtime-blind checks compare against.
            self._loaded_hashes = {}
        for unit in obs.units.values():
            self._loaded_hashes.setdefault(unit.name, definition_hash(unit, obs.facts))
        return replace(obs, loaded_hashes=frozen_map(self._loaded_hashes))

    async def read_changes(
        self, changed: Mapping[str, bool], names: Mapping[str, bool]
    ) -> tuple[Observation, Changed]:
        """Re-read changed paths (path → is a directory) and units (name → unloaded).

        Raises FullResyncNeeded when a unit directory itself changed.
        """
        observer = self._observer()
        assert self.obs is not None
        obs = self.obs
        dirs = {d.path: d for d in obs.unit_dirs}
        scanned = set(obs.scanned_files)
        paths: set[str] = set()
        for path, is_dir in changed.items():
            if not path:
                continue
            if path in dirs:
                # Created, removed, or (a linked directory) retargeted: everything in it changed.
                raise FullResyncNeeded(f"unit directory {path} changed")
            paths.add(path)
            if is_dir:
                inside = {p for p in scanned if p.startswith(path + "/")}
                paths |= inside
                scanned -= inside
        facts = dict(obs.facts)
        facts.update(await observer.read_paths(paths))
        gone = {name for name, removed in names.items() if removed}
        affected = {name for name, removed in names.items() if not removed}
        for path in paths:
            loc = locate(path, dirs)
            fact = facts[path]
            if loc is not None and loc.unit_dir.tier in AUDITED_TIERS:
                if fact.kind in (FileKind.FILE, FileKind.SYMLINK):
                    scanned.add(path)
                else:
                    scanned.discard(path)
            # A unit file nothing loaded is judged from disk alone; the manager is not asked.
            affected |= {n for n in self._index.affected(path, dirs) if n in obs.units}
        units = dict(obs.units)
        for name in gone - affected:
            old = units.pop(name, None)
            if old is not None:
                self._index.remove(old)
            self._loaded_hashes.pop(name, None)
        affected -= gone
        records = await manager.get_unit_records(observer.conn, sorted(affected))
        facts.update(await observer.read_facts(records.values(), (), ()))
        # Re-read definition files may be shared with units outside ``affected``: all count as changed.
        paths.update(p for record in records.values() for p in record.definition_paths)
        for name in affected:
            old = units.pop(name, None)
            if old is not None:
                self._index.remove(old)
        for record in records.values():
            units[record.name] = record
            self._index.add(record)
            # A unit seen for the first time: what is on disk now is the reference.
            self._loaded_hashes.setdefault(record.name, definition_hash(record, facts))
        obs = replace(
            obs,
            units=frozen_map(units),
            facts=frozen_map(facts),
            scanned_files=frozenset(scanned),
            loaded_hashes=frozen_map(self._loaded_hashes),
        )
        return obs, (paths, affected | gone)

    def oversized_definitions(self) -> list[str]:
        """Files over the cap that a daemon-reload would have the manager read for a loaded unit."""
        obs = self.obs
        if obs is None:
            return []
        dirs = {d.path: d for d in obs.unit_dirs}
        return sorted(
            path
            for path, fact in obs.facts.items()
            if fact.oversized
            and could_define_unit(path)
            and any(name in obs.units for name in self._index.affected(path, dirs))
        )

    def judge(self, obs: Observation, changed: Changed | None = None) -> tuple[Finding, ...]:
        """The findings of ``obs``: in full, or re-judging only what ``changed`` since the last."""
        self.obs = obs
        exp = self.expectations()
        if changed is None or self._audit is None or not self._audit.fits(obs, exp):
            self._audit = None  # let the old one go first: two at once set the RSS peak
            self._audit = IncrementalAudit(obs, exp)
            return self._audit.findings
        return self._audit.update(obs, *changed)

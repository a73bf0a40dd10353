"""Every read of the manager and the disk: a full observation, or the part a batch of changes touched."""

from __future__ import annotations

import asyncio
import fnmatch
import os
import posixpath
from collections.abc import Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field, replace

from provenanced.core.index import PathIndex
from provenanced.core.layered import LayeredSet, changed
from provenanced.core.state import Reading, Touched
from provenanced.core.unitpath import AUDITED_TIERS, UserDirs, build_unit_dirs, locate
from provenanced.daemon.changes import Change, FullResync, PathChanged, UnitChanged
from provenanced.errors import ProvenancedError
from provenanced.expect.generation import read_generation
from provenanced.fs.facts import FactReader, scan_unit_dir
from provenanced.model import (
    UNIT_FILE_MAX,
    FileFact,
    FileKind,
    HomeManagerGeneration,
    Observation,
    UnitDir,
    UnitRecord,
    frozen_map,
)
from provenanced.systemd import manager
from provenanced.systemd.bus import ManagerConnection
from provenanced.systemd.names import dropin_dirs_for, is_valid_unit_name, template_of


def user_dirs(env: Mapping[str, str]) -> UserDirs:
    """The XDG base directories the user manager uses, derived like systemd does."""
    home = env.get("HOME") or os.path.expanduser("~")
    runtime = env.get("XDG_RUNTIME_DIR") or f"/run/user/{os.getuid()}"
    return UserDirs(
        home=home,
        config_home=env.get("XDG_CONFIG_HOME") or os.path.join(home, ".config"),
        data_home=env.get("XDG_DATA_HOME") or os.path.join(home, ".local/share"),
        runtime_dir=runtime,
    )


def matches(name: str, patterns: Sequence[str]) -> bool:
    """Whether a unit name matches any shell-style pattern (all names when there are none)."""
    return not patterns or any(fnmatch.fnmatchcase(name, p) for p in patterns)


def scan_files(unit_dirs: Iterable[UnitDir]) -> tuple[str, ...]:
    """Every file in the audited tiers of the search path."""
    return tuple(
        path for d in unit_dirs if d.tier in AUDITED_TIERS for path in scan_unit_dir(d.path)
    )


def _definition_candidates(name: str, unit_dirs: Iterable[UnitDir]) -> Iterable[str]:
    """Every file the manager would read to load ``name``: fragments and drop-ins, any tier."""
    fragments = [name, *filter(None, [template_of(name)])]
    dropin_dirs = dropin_dirs_for(name) if is_valid_unit_name(name) else ()
    for unit_dir in unit_dirs:
        yield from (posixpath.join(unit_dir.path, f) for f in fragments)
        for dropin_dir in dropin_dirs:
            directory = posixpath.join(unit_dir.path, dropin_dir)
            try:
                entries = os.listdir(directory)
            except OSError:
                continue
            yield from (posixpath.join(directory, e) for e in entries if e.endswith(".conf"))


def _check_loadable(name: str, unit_dirs: Iterable[UnitDir]) -> None:
    """Refuse to have the manager load ``name`` when a file it would read is over the cap."""
    for path in _definition_candidates(name, unit_dirs):
        try:
            size = os.stat(path).st_size
        except OSError:
            continue
        if size > UNIT_FILE_MAX:
            raise ProvenancedError(
                f"will not load {name}: {path} is {size} bytes, "
                f"over the {UNIT_FILE_MAX}-byte cap for a unit file"
            )


class _UnitDirChanged(Exception):
    """A unit directory itself changed (created, removed, retargeted): only a full read covers it."""


@dataclass(slots=True)
class Observer:
    """Reads the manager and the disk for one manager connection.

    Keeps what makes the next read cheap: the hash cache, the generation last read, and the index
    of which units a path can affect.
    """

    conn: ManagerConnection
    dirs: UserDirs
    managed_roots: tuple[str, ...]
    read_home_manager: bool = True
    reader: FactReader = field(default_factory=FactReader)
    _generation: HomeManagerGeneration = field(default_factory=HomeManagerGeneration)
    _index: PathIndex = field(default_factory=PathIndex)
    _indexed: Mapping[str, UnitRecord] | None = None  # the units the index describes

    async def unit_dirs(self) -> tuple[UnitDir, ...]:
        """The manager's UnitPath as tiered directories."""
        return build_unit_dirs(await manager.unit_path(self.conn), self.dirs)

    async def observe(
        self, patterns: Sequence[str] = (), load: Sequence[str] = ()
    ) -> tuple[Observation, HomeManagerGeneration]:
        """A full observation: every loaded unit, every audited file, Home Manager's links.

        The generation read last time is kept while the gcroot still leads to it.
        """
        unit_dirs = await self.unit_dirs()
        if self.read_home_manager:
            self._generation = await asyncio.to_thread(
                read_generation, self.dirs.home, unit_dirs, self.reader, self._generation
            )
        else:
            self._generation = HomeManagerGeneration()
        generation = self._generation
        scanned = scan_files(unit_dirs)
        # Only units the manager holds already are read: loading one makes it read the files,
        # work it would not do on its own. Unit files nothing loaded are judged from disk.
        names = [u.name for u in await manager.list_units(self.conn)]
        unloaded = sorted(set(load) - set(names))
        for name in unloaded:
            _check_loadable(name, unit_dirs)
            await manager.load_unit(self.conn, name)
        names = sorted({*names, *unloaded})
        records = await manager.get_unit_records(
            self.conn, [n for n in names if matches(n, patterns)]
        )
        facts = await self.read_facts(records.values(), scanned, generation.links)
        obs = Observation(
            units=frozen_map(records),
            facts=frozen_map(facts),
            unit_dirs=unit_dirs,
            uid=os.getuid(),
            scanned_files=LayeredSet.of(scanned),
        )
        return obs, generation

    async def read(self, batch: Sequence[Change], since: Observation | None) -> Reading:
        """Re-read what ``batch`` touched since ``since``; everything when it asks for that."""
        full = [c for c in batch if isinstance(c, FullResync)]
        if since is not None and not full:
            try:
                return await self._read_touched(batch, since)
            except _UnitDirChanged:
                pass
        obs, generation = await self.observe()
        self._index, self._indexed = PathIndex.build(obs.units.values()), obs.units
        return Reading(
            obs, None, generation, manager_reloaded=any(c.manager_reloaded for c in full)
        )

    async def _read_touched(self, batch: Sequence[Change], since: Observation) -> Reading:
        # Only what changed is built anew: the maps and the scan of ``since`` are layered over,
        # never copied, so a change costs the same at 100 units and at 10,000.
        if since.units is not self._indexed:
            self._index = PathIndex.build(since.units.values())
        obs = since
        dirs = {d.path: d for d in obs.unit_dirs}
        unscanned: set[str] = set()  # left the scan
        rescanned: set[str] = set()  # (back) in the scan
        paths: set[str] = set()
        for change in batch:
            if not isinstance(change, PathChanged) or not change.path:
                continue
            if change.path in dirs:
                raise _UnitDirChanged(change.path)
            paths.add(change.path)
            if change.is_dir:
                inside = {p for p in obs.scanned_files if p.startswith(change.path + "/")}
                paths |= inside
                unscanned |= inside
        facts = await self.read_paths(paths)
        # The last signal about a unit wins: loaded then unloaded is gone, and the reverse is back.
        last = {c.name: c.unloaded for c in batch if isinstance(c, UnitChanged)}
        unloaded = {name for name, gone in last.items() if gone}
        affected = {name for name, gone in last.items() if not gone}
        for path in paths:
            loc = locate(path, dirs)
            fact = facts[path]
            if loc is not None and loc.unit_dir.tier in AUDITED_TIERS:
                if fact.kind in (FileKind.FILE, FileKind.SYMLINK):
                    rescanned.add(path)
                    unscanned.discard(path)
                else:
                    unscanned.add(path)
                    rescanned.discard(path)
            # A unit file nothing loaded is judged from disk alone; the manager is not asked.
            affected |= {n for n in self._index.affected(path, dirs) if n in obs.units}
        dropped = unloaded - affected
        affected -= unloaded
        records = await manager.get_unit_records(self.conn, sorted(affected))
        facts.update(await self.read_facts(records.values(), (), ()))
        # Re-read definition files may be shared with units outside ``affected``: all count as changed.
        paths.update(p for record in records.values() for p in record.definition_paths)
        for name in dropped | affected:
            old = obs.units.get(name)
            if old is not None:
                self._index.remove(old)
        for record in records.values():
            self._index.add(record)
        obs = replace(
            obs,
            units=changed(obs.units, records, dropped | affected),
            facts=changed(obs.facts, facts),
            scanned_files=_layered(obs.scanned_files).changed(rescanned, unscanned),
        )
        self._indexed = obs.units
        return Reading(obs, Touched(frozenset(paths), frozenset(affected | unloaded)))

    async def read_facts(
        self, records: Iterable[UnitRecord], scanned: Iterable[str], expected: Iterable[str]
    ) -> dict[str, FileFact]:
        """Facts for every path the audit may look at."""
        paths = {*scanned, *expected}
        for record in records:
            paths.update(record.definition_paths)
        return await self.read_paths(paths)

    async def read_paths(self, paths: Iterable[str]) -> dict[str, FileFact]:
        """Facts for ``paths``, read in a worker thread: hashing never stalls the event loop."""
        return await asyncio.to_thread(self.reader.read_many, sorted(paths))


def _layered(scan: AbstractSet[str]) -> LayeredSet[str]:
    return scan if isinstance(scan, LayeredSet) else LayeredSet.of(scan)


def baseline_facts(obs: Observation) -> list[FileFact]:
    """The facts a new baseline records: every existing file in an audited tier."""
    by_path = {d.path: d for d in obs.unit_dirs}
    result = []
    for path, fact in obs.facts.items():
        loc = locate(path, by_path)
        if loc is not None and loc.unit_dir.tier in AUDITED_TIERS:
            result.append(fact)
    return result

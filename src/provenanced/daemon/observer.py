"""Every read of the manager and the disk: a full observation, or the part a batch of changes touched.

Over 400 lines on purpose: the observer owns every read of the manager and the disk, full and
partial, so what a change costs is visible in one file.
"""

from __future__ import annotations

import asyncio
import fnmatch
import os
import posixpath
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TypeVar

import structlog

from provenanced.config import ProvenanceSettings
from provenanced.core.index import PathIndex
from provenanced.core.layered import LayeredSet, changed
from provenanced.core.sources import quadlet_source_dirs
from provenanced.core.state import Reading, Touched
from provenanced.core.unitpath import (
    AUDITED_TIERS,
    UserDirs,
    build_unit_dirs,
    locate,
    packaged_dirs,
)
from provenanced.core.vouching import is_packaged
from provenanced.daemon.changes import Change, FullResync, PathChanged, UnitChanged
from provenanced.errors import ProvenancedError
from provenanced.expect.generation import read_generation
from provenanced.expect.packages import PackageDatabase
from provenanced.fs.facts import FactReader, Md5Reader, scan_unit_dir
from provenanced.model import (
    UNIT_FILE_MAX,
    FileFact,
    FileKind,
    HomeManagerGeneration,
    Observation,
    PackageIndex,
    UnitDir,
    UnitRecord,
    frozen_map,
)
from provenanced.systemd import manager
from provenanced.systemd.bus import ManagerConnection
from provenanced.systemd.names import dropin_dirs_for, is_valid_unit_name, template_of

T = TypeVar("T")
_NO_GENERATION = HomeManagerGeneration()
log = structlog.get_logger("provenanced.observer")


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


def scan_files(unit_dirs: Iterable[UnitDir], packaged: Iterable[str] = ()) -> tuple[str, ...]:
    """Every file in the audited tiers of the search path, and in the packaged directories."""
    packaged = frozenset(packaged)
    return tuple(
        path
        for d in unit_dirs
        if d.tier in AUDITED_TIERS or d.path in packaged
        for path in scan_unit_dir(d.path)
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
    packages: PackageDatabase | None = None
    system_root: str = "/"  # where the package database's vendor directories live
    md5: Md5Reader = field(default_factory=Md5Reader)
    # Where file reads run; host mode passes the thread holding the user's credentials.
    executor: Executor | None = None
    uid: int = field(default_factory=os.getuid)  # whose unit files these are (host mode: the user)
    _generation: HomeManagerGeneration = field(default_factory=HomeManagerGeneration)
    _package_index: PackageIndex | None = None
    _package_key: object = None  # the database stamp and directories the index was read for
    _index: PathIndex = field(default_factory=PathIndex)
    _indexed: Mapping[str, UnitRecord] | None = None  # the units the index describes

    def follow(self, provenance: ProvenanceSettings, packages: PackageDatabase | None) -> None:
        """Read by a reloaded configuration's provenance section from now on."""
        self.managed_roots = provenance.managed_roots
        self.read_home_manager = provenance.home_manager
        self.packages = packages
        self.system_root = provenance.package_root

    async def unit_dirs(self) -> tuple[UnitDir, ...]:
        """The manager's UnitPath as tiered directories."""
        return build_unit_dirs(await manager.unit_path(self.conn), self.dirs, self.system_root)

    @property
    def package_index(self) -> PackageIndex | None:
        """What the package database said at the last full observation (None: no database)."""
        return self._package_index

    def read_packages(
        self, unit_dirs: Sequence[UnitDir], keep: bool = False
    ) -> PackageIndex | None:
        """The package index of the vendor directories, read again only when the database changed.

        ``keep``: the index read last stays while it covers the same directories (mid-run).
        """
        if self.packages is None:
            self._package_index = self._package_key = None
            return None
        dirs = packaged_dirs(unit_dirs, self.system_root)
        index = self._package_index
        if keep and index is not None and index.dirs == frozenset(dirs):
            return index
        key = (self.packages.stamp(), dirs)
        if key == self._package_key:
            return index
        try:
            index = self.packages.index(dirs)
        except OSError as exc:
            # Without its database the vendor tier is judged as before: trusted as shipped.
            log.warning("packages.unreadable", database=self.packages.name, error=str(exc))
            index = None
        self._package_key, self._package_index = key, index
        return index

    async def observe(
        self, patterns: Sequence[str] = (), load: Sequence[str] = (), keep_packages: bool = False
    ) -> tuple[Observation, HomeManagerGeneration]:
        """A full observation: every loaded unit, every audited file, Home Manager's links.

        The generation read last time is kept while the gcroot still leads to it, and so is the
        package index while the database is unchanged (or while ``keep_packages``).
        """
        unit_dirs = await self.unit_dirs()
        if self.read_home_manager:
            self._generation = await self._off_loop(
                read_generation,
                self.dirs.home,
                unit_dirs,
                self.reader,
                self._generation,
                quadlet_source_dirs(self.dirs, self.uid),
            )
        else:
            self._generation = _NO_GENERATION  # the same object each time: the same expectations
        generation = self._generation
        packages = self.read_packages(unit_dirs, keep=keep_packages)
        scanned = await self._off_loop(
            scan_files, unit_dirs, packages.dirs if packages is not None else ()
        )
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
        packaged = packages.files if packages is not None else ()
        facts = await self.read_facts(records.values(), scanned, (*generation.links, *packaged))
        obs = Observation(
            units=frozen_map(records),
            facts=frozen_map(facts),
            unit_dirs=unit_dirs,
            uid=self.uid,
            scanned_files=LayeredSet.of(scanned),
        )
        return obs, generation

    async def read(self, batch: Sequence[Change], since: Observation | None) -> Reading:
        """Re-read what ``batch`` touched since ``since``; everything when it asks for that.

        While the package manager is mid-run, the packaged directories stay as ``since`` saw
        them: the end of the run (a watched event) brings the full resync that reads them.
        """
        full = [c for c in batch if isinstance(c, FullResync)]
        held = self._held_packages(since)
        if since is not None and not full:
            try:
                reading = await self._read_touched(batch, since)
            except _UnitDirChanged:
                pass
            else:
                if held is None:
                    return reading
                return replace(reading, observation=_as_before(reading.observation, since, held))
        obs, generation = await self.observe(keep_packages=held is not None)
        if held is not None and since is not None and self._package_index is held:
            obs = _as_before(obs, since, held)
        self._index, self._indexed = PathIndex.build(obs.units.values()), obs.units
        return Reading(
            obs,
            None,
            generation,
            manager_reloaded=any(c.manager_reloaded for c in full),
            packages=self._package_index,
        )

    def _held_packages(self, since: Observation | None) -> PackageIndex | None:
        """The package index to hold on to while the package manager is mid-run, if it is."""
        index = self._package_index
        if since is None or index is None or self.packages is None or not self.packages.busy():
            return None
        return index

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
        facts = await self.read_paths(paths, self._sources_among(paths, obs.units))
        # The last signal about a unit wins: loaded then unloaded is gone, and the reverse is back.
        last = {c.name: c.unloaded for c in batch if isinstance(c, UnitChanged)}
        unloaded = {name for name, gone in last.items() if gone}
        affected = {name for name, gone in last.items() if not gone}
        packaged = self._package_index.dirs if self._package_index is not None else frozenset()
        for path in paths:
            loc = locate(path, dirs)
            fact = facts[path]
            if loc is not None and (
                loc.unit_dir.tier in AUDITED_TIERS or loc.unit_dir.path in packaged
            ):
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
        paths.update(p for record in records.values() for p in _own_paths(record))
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

    def _sources_among(self, paths: Iterable[str], units: Mapping[str, UnitRecord]) -> set[str]:
        """Which of ``paths`` a loaded unit was generated from, found through the index: a
        change does not collect every unit's source."""
        return {
            path
            for path in paths
            for name in self._index.by_path.get(path, ())
            if (unit := units.get(name)) is not None and unit.source_path == path
        }

    async def read_facts(
        self, records: Iterable[UnitRecord], scanned: Iterable[str], expected: Iterable[str]
    ) -> dict[str, FileFact]:
        """Facts for every path the audit may look at."""
        paths = {*scanned, *expected}
        sources = set()
        for record in records:
            paths.update(_own_paths(record))
            sources.add(record.source_path)
        return await self.read_paths(paths, sources)

    async def read_paths(
        self, paths: Iterable[str], sources: Collection[str] = ()
    ) -> dict[str, FileFact]:
        """Facts for ``paths``, read in a worker thread: hashing never stalls the event loop.

        ``sources`` are generated units' sources, hashed although not named like units.
        """
        return await self._off_loop(self._read, sorted(paths), sources)

    async def _off_loop(self, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` on the executor (a worker thread by default)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, partial(fn, *args))

    def _read(self, paths: Iterable[str], sources: Collection[str]) -> dict[str, FileFact]:
        """Facts, with the MD5 a package database checks where it has one for the file."""
        facts = self.reader.read_many(paths, sources)
        index = self._package_index
        if index is None or index.digest != "md5":
            return facts
        for path, fact in facts.items():
            entry = index.files.get(path)
            # No sha256 either: a name the manager never reads, or content that was not read.
            if entry is not None and entry.digests and fact.sha256 is not None:
                facts[path] = replace(fact, md5=self.md5.read(path))
        return facts


def _as_before(obs: Observation, since: Observation, index: PackageIndex) -> Observation:
    """``obs`` with the files of the packaged directories as ``since`` saw them."""
    facts = {p: f for p, f in obs.facts.items() if not is_packaged(p, index)}
    facts.update((p, f) for p, f in since.facts.items() if is_packaged(p, index))
    scanned = {p for p in obs.scanned_files if not is_packaged(p, index)}
    scanned.update(p for p in since.scanned_files if is_packaged(p, index))
    return replace(obs, facts=frozen_map(facts), scanned_files=frozenset(scanned))


def _own_paths(record: UnitRecord) -> tuple[str, ...]:
    """The files a unit is made of: its definition files and the source it was generated from."""
    return (*record.definition_paths, *filter(None, [record.source_path]))


def _layered(scan: AbstractSet[str]) -> LayeredSet[str]:
    return scan if isinstance(scan, LayeredSet) else LayeredSet.of(scan)


def baseline_facts(obs: Observation) -> list[FileFact]:
    """The facts a new baseline records: every existing file in an audited tier, and every source."""
    by_path = {d.path: d for d in obs.unit_dirs}
    sources = {u.source_path for u in obs.units.values()}
    result = []
    for path, fact in obs.facts.items():
        loc = locate(path, by_path)
        if path in sources or (loc is not None and loc.unit_dir.tier in AUDITED_TIERS):
            result.append(fact)
    return result

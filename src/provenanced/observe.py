"""Gather one consistent ``Observation`` and the ``Expectations`` to judge it by."""

from __future__ import annotations

import asyncio
import fnmatch
import os
import posixpath
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from provenanced.errors import ProvenancedError
from provenanced.expect import homemanager
from provenanced.fs.facts import FactReader, scan_unit_dir
from provenanced.model import (
    UNIT_FILE_MAX,
    BaselineEntry,
    Expectations,
    FileFact,
    Observation,
    UnitDir,
    UnitRecord,
    frozen_map,
)
from provenanced.systemd import manager
from provenanced.systemd.bus import ManagerConnection
from provenanced.systemd.names import dropin_dirs_for, is_valid_unit_name, template_of
from provenanced.unitpath import AUDITED_TIERS, UserDirs, build_unit_dirs, locate


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


@dataclass(slots=True)
class Observer:
    """Reads the manager and the disk; keeps a hash cache between observations."""

    conn: ManagerConnection
    dirs: UserDirs
    managed_roots: tuple[str, ...]
    read_home_manager: bool = True
    reader: FactReader | None = None

    def __post_init__(self) -> None:
        if self.reader is None:
            self.reader = FactReader()

    @property
    def facts(self) -> FactReader:
        """The shared fact reader."""
        assert self.reader is not None
        return self.reader

    async def unit_dirs(self) -> tuple[UnitDir, ...]:
        """The manager's UnitPath as tiered directories."""
        return build_unit_dirs(await manager.unit_path(self.conn), self.dirs)

    async def observe(
        self,
        patterns: Sequence[str] = (),
        loaded_hashes: Mapping[str, str] | None = None,
        load: Sequence[str] = (),
        known_generation: homemanager.Generation | None = None,
    ) -> tuple[Observation, homemanager.Generation]:
        """A full observation: every loaded unit, every audited file, Home Manager's links.

        ``load``: units to load first if the manager has not (an explicit request, as ``show``).
        ``known_generation``: the generation read last time, kept if the gcroot still leads there.
        """
        unit_dirs = await self.unit_dirs()
        generation = (
            await asyncio.to_thread(
                homemanager.read_generation,
                self.dirs.home,
                unit_dirs,
                self.facts,
                known_generation,
            )
            if self.read_home_manager
            else homemanager.Generation(None, None, {})
        )
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
            scanned_files=frozenset(scanned),
            loaded_hashes=loaded_hashes,
        )
        return obs, generation

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
        return await asyncio.to_thread(self.facts.read_many, sorted(paths))

    def expectations(
        self,
        generation: homemanager.Generation,
        accepted: Mapping[str, BaselineEntry] | None,
    ) -> Expectations:
        """Expectations from the generation, the managed roots and the accepted baseline."""
        return Expectations(
            managed_roots=self.managed_roots,
            home_manager_generation=generation.path,
            home_manager_files=generation.home_files,
            home_manager_links=frozen_map(generation.links),
            baseline=frozen_map(accepted or {}),
        )


def baseline_facts(obs: Observation) -> list[FileFact]:
    """The facts a new baseline records: every existing file in an audited tier."""
    by_path = {d.path: d for d in obs.unit_dirs}
    result = []
    for path, fact in obs.facts.items():
        loc = locate(path, by_path)
        if loc is not None and loc.unit_dir.tier in AUDITED_TIERS:
            result.append(fact)
    return result

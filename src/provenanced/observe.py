"""Gather one consistent ``Observation`` and the ``Expectations`` to judge it by."""

from __future__ import annotations

import asyncio
import fnmatch
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from provenanced.expect import homemanager
from provenanced.fs.facts import FactReader, scan_unit_dir
from provenanced.model import (
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


def _unloaded_fragments(
    files: Iterable[str], unit_dirs: Sequence[UnitDir], loaded: Iterable[str]
) -> set[str]:
    by_path = {d.path: d for d in unit_dirs}
    names = set()
    for path in files:
        loc = locate(path, by_path)
        # Templates cannot be loaded by name; their instances are loaded on use.
        if loc is not None and loc.is_fragment and not loc.unit.split(".")[0].endswith("@"):
            names.add(loc.unit)
    return names - set(loaded)


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
        names = [u.name for u in await manager.list_units(self.conn)]
        expected_names = _unloaded_fragments((*scanned, *generation.links), unit_dirs, names)
        expected_names.update(set(load) - set(names))
        for name in sorted(expected_names):
            await manager.load_unit(self.conn, name)
        names = sorted({*names, *expected_names})
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

"""The audit kept current change by change: a change re-judges only the paths and units it touches."""

from __future__ import annotations

from collections.abc import Iterable
from itertools import chain

from provenanced.core.audit import Judge, drop_subsumed, expected_paths
from provenanced.core.unitpath import locate
from provenanced.model import Expectations, Finding, Observation, UnitRecord


class IncrementalAudit:
    """Findings kept by what produced them (a path or a unit), equal to a full ``audit()``.

    Valid while the expectations and the unit directories stay the same; when either changes,
    build a new one.
    """

    def __init__(self, obs: Observation, exp: Expectations) -> None:
        self._judge = Judge.build(exp, obs.unit_dirs)
        self._defined_by: dict[str, set[str]] = {}  # definition path → the loaded units it defines
        self._sourced_by: dict[str, set[str]] = {}  # source path → the loaded units made from it
        self._paths_of: dict[str, tuple[str, ...]] = {}  # loaded unit → its definition paths
        self._source_of: dict[str, str] = {}  # loaded unit → its source path
        self._by_path: dict[str, tuple[Finding, ...]] = {}
        self._by_unit: dict[str, tuple[Finding, ...]] = {}
        for unit in obs.units.values():
            self._index(unit)
        self._judge_paths(obs, {*obs.scanned_files, *expected_paths(exp)})
        self._judge_paths(obs, {*self._defined_by, *self._sourced_by})
        self._judge_units(obs, obs.units)
        self.findings = self._merge()

    def fits(self, obs: Observation, exp: Expectations) -> bool:
        """Whether this audit can follow ``obs`` by updates (same expectations and directories)."""
        return exp is self._judge.exp and obs.unit_dirs == self._judge.unit_dirs

    def update(
        self, obs: Observation, paths: Iterable[str], units: Iterable[str]
    ) -> tuple[Finding, ...]:
        """The findings once ``paths`` changed on disk (fact or scan) and ``units`` were re-read.

        ``units`` names every unit whose record or loaded hash changed, loaded or gone.
        """
        paths = set(paths)
        touched_units = set(units)
        touched_paths = set(paths)
        for name in touched_units:
            for path in self._paths_of.pop(name, ()):
                touched_paths.add(path)
                _unindex(self._defined_by, path, name)
            source = self._source_of.pop(name, None)
            if source is not None:
                touched_paths.add(source)
                _unindex(self._sourced_by, source, name)
            record = obs.units.get(name)
            if record is not None:
                self._index(record)
                touched_paths.update(record.definition_paths)
                if record.source_path:
                    touched_paths.add(record.source_path)
        for path in paths:
            # A unit's hash covers its definition files and source; its shadow check, the managed fragment.
            touched_units.update(self._defined_by.get(path, ()))
            touched_units.update(self._sourced_by.get(path, ()))
            loc = locate(path, self._judge.dirs)
            if loc is not None:
                touched_units.add(loc.unit)
        self._judge_paths(obs, touched_paths)
        self._judge_units(obs, touched_units)
        self.findings = self._merge()
        return self.findings

    def _index(self, unit: UnitRecord) -> None:
        paths = tuple(dict.fromkeys(unit.definition_paths))  # a path listed twice is one path
        self._paths_of[unit.name] = paths
        for path in paths:
            self._defined_by.setdefault(path, set()).add(unit.name)
        if unit.source_path:
            self._source_of[unit.name] = unit.source_path
            self._sourced_by.setdefault(unit.source_path, set()).add(unit.name)

    def _judge_paths(self, obs: Observation, paths: Iterable[str]) -> None:
        for path in paths:
            owners = self._defined_by.get(path)
            found: tuple[Finding, ...] = ()
            if owners or self._judge.is_audited(obs, path):
                found = tuple(self._judge.path(obs, path, min(owners) if owners else None))
            made = self._sourced_by.get(path)
            if made:
                found += tuple(self._judge.source(obs, path, min(made)))
            _store(self._by_path, path, found)

    def _judge_units(self, obs: Observation, names: Iterable[str]) -> None:
        for name in names:
            record = obs.units.get(name)
            _store(self._by_unit, name, tuple(self._judge.unit(obs, record)) if record else ())

    def _merge(self) -> tuple[Finding, ...]:
        return drop_subsumed(
            chain.from_iterable(chain(self._by_path.values(), self._by_unit.values()))
        )


def _unindex(table: dict[str, set[str]], path: str, name: str) -> None:
    names = table[path]
    names.discard(name)
    if not names:
        del table[path]


def _store(table: dict[str, tuple[Finding, ...]], key: str, found: tuple[Finding, ...]) -> None:
    # Most paths and units are clean: keep only the ones with findings.
    if found:
        table[key] = found
    else:
        table.pop(key, None)

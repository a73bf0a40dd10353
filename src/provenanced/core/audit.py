"""The pure provenance core: an observation plus expectations in, findings out.

Which files and units are judged, and the rules for a unit as a whole; the rules for one file
are in ``file_rules.py``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from provenanced.core.file_rules import (
    Place,
    check_expected,
    check_missing,
    check_owner_and_mode,
    check_packaged,
    check_unexpected,
    new_finding,
    place_of,
)
from provenanced.core.sources import is_vendor_source
from provenanced.core.unitpath import AUDITED_TIERS, Location, locate
from provenanced.core.vouching import (
    in_managed_root,
)
from provenanced.model import (
    Expectations,
    FileFact,
    FileKind,
    Finding,
    FindingKind,
    Observation,
    PackageIndex,
    UnitDir,
    UnitRecord,
)

K = FindingKind

# When one path yields several of these, only the most specific is reported.
_SUBSUMES: Mapping[FindingKind, frozenset[FindingKind]] = {
    K.MASKED: frozenset({K.SHADOWED, K.UNMANAGED_UNIT, K.UNMANAGED_DROPIN, K.LINK_RETARGETED}),
    K.SHADOWED: frozenset({K.UNMANAGED_UNIT}),
}


_LOAD_ERRORS = frozenset({"error", "bad-setting"})


def definition_hash(unit: UnitRecord, facts: Mapping[str, FileFact]) -> str:
    """A hash of what defines a unit: each fragment/drop-in/source path with its content hash."""
    digest = hashlib.sha256()
    # The source counts: an edit that keeps its mtime is invisible to NeedDaemonReload.
    for path in (*unit.definition_paths, *filter(None, [unit.source_path])):
        fact = facts.get(path)
        digest.update(f"{path}\0{fact.sha256 if fact else ''}\0".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


@dataclass(frozen=True, slots=True)
class Judge:
    """The expectations indexed once (per generation and baseline), to judge paths and units."""

    exp: Expectations
    unit_dirs: tuple[UnitDir, ...]
    dirs: Mapping[str, UnitDir]
    expected_units: frozenset[str]
    fragments: Mapping[str, tuple[str, ...]]  # unit → its fragment paths in the expectations

    @classmethod
    def build(cls, exp: Expectations, unit_dirs: tuple[UnitDir, ...]) -> Judge:
        """Index which units Home Manager provides and where their fragments belong."""
        dirs = {d.path: d for d in unit_dirs}
        units: set[str] = set()
        fragments: dict[str, list[str]] = {}
        for path in sorted(exp.home_manager_links):
            loc = locate(path, dirs)
            if loc is None:
                continue
            units.add(loc.unit)
            if loc.is_fragment:
                fragments.setdefault(loc.unit, []).append(path)
        return cls(
            exp,
            unit_dirs,
            dirs,
            frozenset(units),
            {unit: tuple(paths) for unit, paths in fragments.items()},
        )

    def is_audited(self, obs: Observation, path: str) -> bool:
        """Whether a path is judged even when no loaded unit names it."""
        return (
            path in obs.scanned_files
            or path in self.exp.home_manager_links
            or path in self.exp.baseline
            or (self.exp.packages is not None and path in self.exp.packages.files)
        )

    def path(self, obs: Observation, path: str, unit_hint: str | None) -> Iterator[Finding]:
        """Findings about one file (``unit_hint``: the loaded unit that owns it, if any)."""
        return _check_path(self, obs, path, unit_hint)

    def source(self, obs: Observation, path: str, unit: str) -> Iterator[Finding]:
        """Findings about the file a generated ``unit`` was made from (its ``SourcePath``)."""
        return _check_source(self, obs, path, unit)

    def unit(self, obs: Observation, unit: UnitRecord) -> Iterator[Finding]:
        """Findings about one loaded unit as a whole."""
        return _check_unit(self, obs, unit)

    def locate(self, path: str) -> Location | None:
        """The unit directory ``path`` lives in, and the unit it belongs to."""
        return locate(path, self.dirs)

    def packages_of(self, loc: Location) -> PackageIndex | None:
        """The package database that vouches for files in this location's directory, if any."""
        packages = self.exp.packages
        return packages if packages is not None and loc.unit_dir.path in packages.dirs else None

    @staticmethod
    def fact(obs: Observation, path: str) -> FileFact:
        """What ``obs`` knows of ``path``; a path it never read is missing."""
        return obs.facts.get(path) or FileFact(path, FileKind.MISSING)


def _check_path(
    judge: Judge, obs: Observation, path: str, unit_hint: str | None
) -> Iterator[Finding]:
    loc = judge.locate(path)
    if loc is None:
        return
    packages = judge.packages_of(loc)
    if loc.unit_dir.tier not in AUDITED_TIERS and packages is None:
        return
    if unit_hint is None and packages is None and not loc.could_be_read:
        return  # a name the manager never loads (``CuXXXXXX``, ``x.service.backup``): no unit's drift
    unit = unit_hint or loc.unit
    fact = judge.fact(obs, path)
    if packages is not None:
        # The package database alone vouches for its directories: Home Manager and the
        # baseline never reach them.
        if fact.kind is not FileKind.MISSING:
            yield from check_owner_and_mode(judge, obs, place_of(loc), path, fact)
        yield from check_packaged(packages, unit, loc, path, fact)
        return
    if fact.kind is FileKind.MISSING:
        missing = tuple(check_missing(judge, obs, path, unit))
        if not missing and fact.error:
            # lstat itself failed (a parent we may not search): nothing can vouch for this path.
            yield new_finding(
                place_of(loc).unmanaged,
                unit,
                path,
                f"cannot be examined ({fact.error}), so nothing vouches for it",
            )
        yield from missing
        return
    place = place_of(loc)
    yield from check_owner_and_mode(judge, obs, place, path, fact)
    expected = judge.exp.home_manager_links.get(path)
    if expected is not None:
        yield from check_expected(judge, obs, unit, path, fact, expected)
    elif fact.kind is not FileKind.DIRECTORY:
        yield from check_unexpected(judge, obs, place, path, fact)


def _check_source(judge: Judge, obs: Observation, path: str, unit: str) -> Iterator[Finding]:
    # A generated unit is vouched for by its generator only as far as its source is.
    if is_vendor_source(path):
        return
    fact = judge.fact(obs, path)
    if fact.kind is FileKind.MISSING:
        yield from check_missing(judge, obs, path, unit)
        return
    # Sources in /etc/containers/systemd/users are root's by design: no ownership check.
    place = Place(unit, K.UNMANAGED_UNIT, "the source of a generated unit", False, False)
    yield from check_owner_and_mode(judge, obs, place, path, fact)
    expected = judge.exp.home_manager_links.get(path)
    if expected is not None:
        yield from check_expected(judge, obs, unit, path, fact, expected)
    elif fact.kind is not FileKind.DIRECTORY and not in_managed_root(fact, judge.exp):
        yield from check_unexpected(judge, obs, place, path, fact)


def _check_unit(judge: Judge, obs: Observation, unit: UnitRecord) -> Iterator[Finding]:
    name, fragment = unit.name, unit.fragment_path
    if unit.need_daemon_reload:
        yield new_finding(
            K.STALE_LOAD,
            name,
            fragment,
            "NeedDaemonReload=yes: the files on disk changed since the manager loaded this unit",
        )
    elif (
        obs.loaded_hashes is not None
        and name in obs.loaded_hashes
        and definition_hash(unit, obs.facts) != obs.loaded_hashes[name]
    ):
        yield new_finding(
            K.STALE_LOAD,
            name,
            fragment,
            "the definition on disk differs from the one loaded at the last reload "
            "(systemd's mtime check does not see it)",
        )
    expected_paths = judge.fragments.get(name, ())
    if unit.load_state in _LOAD_ERRORS or (
        unit.load_state == "not-found" and name in judge.expected_units
    ):
        where = fragment or (expected_paths[0] if expected_paths else "")
        yield new_finding(
            K.LOAD_ERROR, name, where, f"LoadState={unit.load_state}: the manager could not load it"
        )
    if unit.load_state == "masked" and name in judge.expected_units:
        yield new_finding(
            K.MASKED, name, fragment, "the unit is masked while Home Manager provides it"
        )
    if fragment and expected_paths and fragment not in expected_paths:
        yield from _check_shadowed(judge, obs, unit, expected_paths)


def _check_shadowed(
    judge: Judge, obs: Observation, unit: UnitRecord, expected_paths: tuple[str, ...]
) -> Iterator[Finding]:
    here = judge.locate(unit.fragment_path)
    for path in expected_paths:
        there = judge.locate(path)
        present = judge.fact(obs, path).kind is not FileKind.MISSING
        if (
            present
            and here is not None
            and there is not None
            and here.unit_dir.priority < there.unit_dir.priority
        ):
            yield new_finding(
                K.SHADOWED,
                unit.name,
                unit.fragment_path,
                f"this {here.unit_dir.tier.value}-tier fragment overrides the managed one at {path}",
            )
            return


def owners(units: Iterable[UnitRecord]) -> dict[str, str]:
    """Each definition path with the loaded unit that owns its findings.

    Instances of one template (and aliases) share a fragment: the first name in order owns its
    findings, so a finding's identity never depends on the order units were read in.
    """
    result: dict[str, str] = {}
    for unit in units:
        for path in unit.definition_paths:
            if path not in result or unit.name < result[path]:
                result[path] = unit.name
    return result


def source_owners(units: Iterable[UnitRecord]) -> dict[str, str]:
    """Each source path (``SourcePath``) with the loaded unit that owns its findings."""
    result: dict[str, str] = {}
    for unit in units:
        path = unit.source_path
        if path and (path not in result or unit.name < result[path]):
            result[path] = unit.name
    return result


def drop_subsumed(findings: Iterable[Finding]) -> tuple[Finding, ...]:
    """The findings without duplicates or the ones a more specific kind on the same path covers."""
    unique = {f.key: f for f in findings}
    by_path: dict[tuple[str, str], set[FindingKind]] = {}
    for kind, unit, path in unique:
        by_path.setdefault((unit, path), set()).add(kind)
    kept = []
    for finding in unique.values():
        kinds = by_path[(finding.unit, finding.path)]
        if not any(finding.kind in _SUBSUMES.get(other, frozenset()) for other in kinds):
            kept.append(finding)
    return tuple(sorted(kept, key=lambda f: (f.unit, f.kind.value, f.path)))


def expected_paths(exp: Expectations) -> set[str]:
    """Every path something expects to exist: judged even when nothing scanned or loaded it."""
    packaged = exp.packages.files if exp.packages is not None else ()
    return {*exp.home_manager_links, *exp.baseline, *packaged}


def audit(obs: Observation, exp: Expectations) -> tuple[Finding, ...]:
    """Every drift in one observation, judged against what is expected; sorted, no duplicates."""
    judge = Judge.build(exp, obs.unit_dirs)
    owned = owners(obs.units.values())
    paths = {*obs.scanned_files, *expected_paths(exp), *owned}
    findings: list[Finding] = []
    for path in paths:
        findings.extend(judge.path(obs, path, owned.get(path)))
    for path, unit_name in source_owners(obs.units.values()).items():
        findings.extend(judge.source(obs, path, unit_name))
    for unit in obs.units.values():
        findings.extend(judge.unit(obs, unit))
    return drop_subsumed(findings)

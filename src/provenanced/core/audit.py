"""The pure provenance core: an observation plus expectations in, findings out."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from provenanced.core.sources import is_vendor_source
from provenanced.core.unitpath import AUDITED_TIERS, USER_TIERS, Location, locate
from provenanced.core.vouching import (
    home_manager_files_dir,
    in_linked_managed_dir,
    in_managed_root,
    is_under,
    matches_expected,
    package_state,
    same_as_baseline,
    through_expected_dir,
)
from provenanced.model import (
    BaselineEntry,
    Expectations,
    ExpectedLink,
    FileFact,
    FileKind,
    Finding,
    FindingKind,
    Observation,
    PackageIndex,
    Severity,
    UnitDir,
    UnitRecord,
)

K = FindingKind

SEVERITY: Mapping[FindingKind, Severity] = {
    K.LINK_REPLACED: "warning",
    K.LINK_RETARGETED: "warning",
    K.LINK_DANGLING: "critical",
    K.MANAGED_MISSING: "warning",
    K.ORPHAN_LINK: "warning",
    K.UNMANAGED_UNIT: "warning",
    K.UNMANAGED_DROPIN: "warning",
    K.SHADOWED: "warning",
    K.MASKED: "warning",
    K.STALE_LOAD: "warning",
    K.LOAD_ERROR: "critical",
    K.JOB_UNVERIFIED: "critical",
    K.FOREIGN_OWNER: "critical",
    K.UNSAFE_MODE: "critical",
    # Edited in place: what runs is not what the package shipped, and its next upgrade will
    # silently overwrite the edit; as a divergent replaced link, it pages.
    K.PACKAGE_MODIFIED: "critical",
    # Nothing vouches for it, as for an unmanaged unit file in a user directory.
    K.PACKAGE_UNOWNED: "warning",
}

# When one path yields several of these, only the most specific is reported.
_SUBSUMES: Mapping[FindingKind, frozenset[FindingKind]] = {
    K.MASKED: frozenset({K.SHADOWED, K.UNMANAGED_UNIT, K.UNMANAGED_DROPIN, K.LINK_RETARGETED}),
    K.SHADOWED: frozenset({K.UNMANAGED_UNIT}),
}


_LOAD_ERRORS = frozenset({"error", "bad-setting"})


def _finding(kind: FindingKind, unit: str, path: str, detail: str) -> Finding:
    severity = SEVERITY[kind]
    if kind is K.LINK_REPLACED and detail.startswith("divergent"):
        severity = "critical"
    return Finding(kind, unit, path, severity, detail)


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


def _dangling_detail(fact: FileFact) -> str:
    # A loop or a chain past the kernel's 40 links (ELOOP) cannot be resolved either.
    if fact.error:
        return f"symlink to {fact.target}, which cannot be resolved ({fact.error})"
    return f"symlink to {fact.target}, which does not exist"


def _short(sha: str | None) -> str:
    return sha[:12] if sha else "-"


def _content(fact: FileFact) -> str:
    """The short hash of a file, or why it has none."""
    return f"unknown, {fact.error}" if fact.sha256 is None and fact.error else _short(fact.sha256)


def _unread(fact: FileFact) -> str:
    """A detail's note that the file's content could not be read, and why."""
    return f"; its content is unknown: {fact.error}" if fact.sha256 is None and fact.error else ""


def _check_missing(judge: Judge, obs: Observation, path: str, unit: str) -> Iterator[Finding]:
    expected = judge.exp.home_manager_links.get(path)
    if expected is not None:
        yield _finding(
            K.MANAGED_MISSING,
            unit,
            path,
            f"Home Manager's current generation links this path to {expected.target}; it is absent",
        )
        return
    base = judge.exp.baseline.get(path)
    if (
        base is not None
        and base.kind is FileKind.SYMLINK
        and is_under(base.resolved, judge.exp.managed_roots)
    ):
        yield _finding(
            K.MANAGED_MISSING,
            unit,
            path,
            f"the accepted baseline had a managed link here to {base.target}; it is absent",
        )


@dataclass(frozen=True, slots=True)
class _Place:
    """What a judged file is to its unit: where it sits, and what an unvouched one is called."""

    unit: str
    unmanaged: FindingKind
    where: str  # the start of an "unmanaged" detail
    user_tier: bool  # a file only the user should own
    can_mask: bool  # an empty file or a /dev/null link here masks the unit


def _place_of(loc: Location) -> _Place:
    return _Place(
        loc.unit,
        K.UNMANAGED_DROPIN if loc.is_dropin else K.UNMANAGED_UNIT,
        f"a file in the {loc.unit_dir.tier.value} tier",
        loc.unit_dir.tier in USER_TIERS,
        # An empty or /dev/null drop-in masks only same-named drop-ins, never the unit itself.
        not loc.is_dropin,
    )


def _check_owner_and_mode(
    judge: Judge, obs: Observation, place: _Place, path: str, fact: FileFact
) -> Iterator[Finding]:
    unit = place.unit
    if in_linked_managed_dir(fact, judge.exp):
        return  # a read-only store file, root-owned by design: nobody rewrites it in place
    if place.user_tier and fact.uid is not None and fact.uid != obs.uid:
        what = "symlink" if fact.kind is FileKind.SYMLINK else "file"
        yield _finding(
            K.FOREIGN_OWNER,
            unit,
            path,
            f"{what} is owned by uid {fact.uid}, not by the manager's user (uid {obs.uid})",
        )
    # /dev/null is world-writable by design; a mask link is judged as masked, not by mode.
    if (
        fact.mode is not None
        and fact.mode & 0o022
        and fact.kind in (FileKind.FILE, FileKind.SYMLINK)
        and (fact.resolved != "/dev/null")
    ):
        who = "others" if fact.mode & 0o002 else "the group"
        via = " (the link's target)" if fact.kind is FileKind.SYMLINK else ""
        yield _finding(
            K.UNSAFE_MODE,
            unit,
            path,
            f"mode {fact.mode:04o}{via} lets {who} rewrite this unit definition",
        )


def _check_expected(
    judge: Judge, obs: Observation, unit: str, path: str, fact: FileFact, expected: ExpectedLink
) -> Iterator[Finding]:
    if fact.masked:
        yield _finding(
            K.MASKED, unit, path, "masked here, but Home Manager's current generation provides it"
        )
    elif through_expected_dir(fact, expected):
        return  # Home Manager linked the whole directory, and this is the file it holds
    elif fact.kind is FileKind.FILE:
        state = "latent" if fact.sha256 and fact.sha256 == expected.sha256 else "divergent"
        what = "same content as" if state == "latent" else "different content from"
        yield _finding(
            K.LINK_REPLACED,
            unit,
            path,
            f"{state}: a regular file with {what} the managed target {expected.target} "
            f"(sha256 {_content(fact)}, expected {_short(expected.sha256)})",
        )
    elif fact.kind is FileKind.SYMLINK:
        if fact.dangling:
            yield _finding(K.LINK_DANGLING, unit, path, _dangling_detail(fact))
        elif matches_expected(fact, expected):
            return
        elif (
            hm_dir := home_manager_files_dir(fact.target)
        ) and hm_dir != judge.exp.home_manager_files:
            yield _finding(
                K.ORPHAN_LINK,
                unit,
                path,
                f"points into {hm_dir}, not the current generation's {judge.exp.home_manager_files}",
            )
        else:
            yield _finding(
                K.LINK_RETARGETED,
                unit,
                path,
                f"resolves to {fact.resolved}, but Home Manager links it to {expected.target}",
            )
    else:
        yield _finding(
            K.LINK_REPLACED,
            unit,
            path,
            f"divergent: a {fact.kind.value} where a managed link belongs",
        )


def _check_unexpected(
    judge: Judge, obs: Observation, place: _Place, path: str, fact: FileFact
) -> Iterator[Finding]:
    unit = place.unit
    base = judge.exp.baseline.get(path)
    if (
        fact.masked
        and place.can_mask
        and (unit in judge.expected_units or (base is not None and not _base_masked(base)))
    ):
        yield _finding(K.MASKED, unit, path, "masks a unit that is expected to be defined")
        return
    if fact.kind is FileKind.SYMLINK:
        yield from _check_unexpected_link(judge, obs, place, path, fact, base)
    elif (base is not None and same_as_baseline(fact, base)) or in_linked_managed_dir(
        fact, judge.exp
    ):
        return
    elif fact.kind is FileKind.FILE:
        if (
            base is not None
            and base.kind is FileKind.SYMLINK
            and is_under(base.resolved, judge.exp.managed_roots)
        ):
            state = "latent" if fact.sha256 and fact.sha256 == base.sha256 else "divergent"
            yield _finding(
                K.LINK_REPLACED,
                unit,
                path,
                f"{state}: a regular file where the accepted baseline had a managed link to "
                f"{base.target}{_unread(fact)}",
            )
        elif base is not None and not fact.error:
            yield _finding(
                place.unmanaged,
                unit,
                path,
                f"content changed since the accepted baseline (sha256 {_short(base.sha256)} → {_short(fact.sha256)})",
            )
        else:
            yield _finding(
                place.unmanaged,
                unit,
                path,
                f"{place.where} that neither Home Manager, a managed root "
                f"nor the accepted baseline vouches for{_unread(fact)}",
            )


def _base_masked(base: BaselineEntry) -> bool:
    return base.resolved == "/dev/null"


def _check_unexpected_link(
    judge: Judge,
    obs: Observation,
    place: _Place,
    path: str,
    fact: FileFact,
    base: BaselineEntry | None,
) -> Iterator[Finding]:
    unit = place.unit
    vouched = base is not None and same_as_baseline(fact, base)
    if fact.dangling and not vouched:
        yield _finding(K.LINK_DANGLING, unit, path, _dangling_detail(fact))
        return
    hm_dir = home_manager_files_dir(fact.target)
    if hm_dir is not None and hm_dir != judge.exp.home_manager_files:
        current = judge.exp.home_manager_files or "no current generation"
        yield _finding(
            K.ORPHAN_LINK,
            unit,
            path,
            f"points into {hm_dir}, which is not the current Home Manager generation ({current})",
        )
        return
    if vouched or fact.dangling or is_under(fact.resolved, judge.exp.managed_roots):
        return
    if base is not None and base.kind is FileKind.SYMLINK:
        yield _finding(
            K.LINK_RETARGETED,
            unit,
            path,
            f"resolves to {fact.resolved}, outside the managed roots; the accepted baseline had {base.target}",
        )
        return
    yield _finding(
        place.unmanaged,
        unit,
        path,
        f"symlink to {fact.resolved}, outside the managed roots, and nothing vouches for it"
        f"{_unread(fact)}",
    )


def _check_packaged(
    packages: PackageIndex, unit: str, loc: Location, path: str, fact: FileFact
) -> Iterator[Finding]:
    state = package_state(path, fact, packages)
    entry = packages.files.get(path)
    if state == "intact" or fact.kind is FileKind.DIRECTORY:
        return
    if entry is None:
        if fact.kind is FileKind.MISSING:
            return
        diverted = packages.diverted.get(path)
        moved = f"; it diverts the packaged file to {diverted}" if diverted else ""
        yield _finding(
            K.PACKAGE_UNOWNED,
            unit,
            path,
            f"no package owns this {loc.unit_dir.tier.value}-tier file "
            f"(not in the {packages.manager} database){moved}",
        )
        return
    names = ", ".join(entry.packages)
    if state == "missing":
        why = f" ({fact.error})" if fact.error else ""
        detail = f"missing{why}: package {names} installed it ({packages.manager})"
    elif fact.kind is not FileKind.FILE:
        found = f"a symlink to {fact.target}" if fact.kind is FileKind.SYMLINK else "something else"
        detail = f"{found} where package {names} installed a regular file ({packages.manager})"
    else:
        digest = fact.md5 if packages.digest == "md5" else fact.sha256
        now = _short(digest) if digest else f"unreadable: {fact.error or 'not hashed'}"
        recorded = ", ".join(sorted(_short(d) for d in entry.digests))
        detail = (
            f"differs from the file package {names} installed "
            f"({packages.digest} {now}, {packages.manager} recorded {recorded})"
        )
    yield _finding(K.PACKAGE_MODIFIED, unit, path, detail)


def _check_path(
    judge: Judge, obs: Observation, path: str, unit_hint: str | None
) -> Iterator[Finding]:
    loc = judge.locate(path)
    if loc is None:
        return
    packages = judge.packages_of(loc)
    if loc.unit_dir.tier not in AUDITED_TIERS and packages is None:
        return
    unit = unit_hint or loc.unit
    fact = judge.fact(obs, path)
    if packages is not None:
        # The package database alone vouches for its directories: Home Manager and the
        # baseline never reach them.
        if fact.kind is not FileKind.MISSING:
            yield from _check_owner_and_mode(judge, obs, _place_of(loc), path, fact)
        yield from _check_packaged(packages, unit, loc, path, fact)
        return
    if fact.kind is FileKind.MISSING:
        missing = tuple(_check_missing(judge, obs, path, unit))
        if not missing and fact.error:
            # lstat itself failed (a parent we may not search): nothing can vouch for this path.
            yield _finding(
                _place_of(loc).unmanaged,
                unit,
                path,
                f"cannot be examined ({fact.error}), so nothing vouches for it",
            )
        yield from missing
        return
    place = _place_of(loc)
    yield from _check_owner_and_mode(judge, obs, place, path, fact)
    expected = judge.exp.home_manager_links.get(path)
    if expected is not None:
        yield from _check_expected(judge, obs, unit, path, fact, expected)
    elif fact.kind is not FileKind.DIRECTORY:
        yield from _check_unexpected(judge, obs, place, path, fact)


def _check_source(judge: Judge, obs: Observation, path: str, unit: str) -> Iterator[Finding]:
    # A generated unit is vouched for by its generator only as far as its source is.
    if is_vendor_source(path):
        return
    fact = judge.fact(obs, path)
    if fact.kind is FileKind.MISSING:
        yield from _check_missing(judge, obs, path, unit)
        return
    # Sources in /etc/containers/systemd/users are root's by design: no ownership check.
    place = _Place(unit, K.UNMANAGED_UNIT, "the source of a generated unit", False, False)
    yield from _check_owner_and_mode(judge, obs, place, path, fact)
    expected = judge.exp.home_manager_links.get(path)
    if expected is not None:
        yield from _check_expected(judge, obs, unit, path, fact, expected)
    elif fact.kind is not FileKind.DIRECTORY and not in_managed_root(fact, judge.exp):
        yield from _check_unexpected(judge, obs, place, path, fact)


def _check_unit(judge: Judge, obs: Observation, unit: UnitRecord) -> Iterator[Finding]:
    name, fragment = unit.name, unit.fragment_path
    if unit.need_daemon_reload:
        yield _finding(
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
        yield _finding(
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
        yield _finding(
            K.LOAD_ERROR, name, where, f"LoadState={unit.load_state}: the manager could not load it"
        )
    if unit.load_state == "masked" and name in judge.expected_units:
        yield _finding(
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
            yield _finding(
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

"""The rules for one file: who vouches for it and, when nobody does, which drift it is.

``audit.py`` decides which files and units to judge; these functions judge one file each.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from provenanced.core.unitpath import USER_TIERS, Location
from provenanced.core.vouching import (
    baseline_entry,
    home_manager_files_dir,
    in_linked_managed_dir,
    is_under,
    matches_expected,
    package_state,
    same_as_baseline,
    through_expected_dir,
)
from provenanced.model import (
    BaselineEntry,
    ExpectedLink,
    FileFact,
    FileKind,
    Finding,
    FindingKind,
    Observation,
    PackageIndex,
    Severity,
)

if TYPE_CHECKING:
    from provenanced.core.audit import Judge

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


def new_finding(kind: FindingKind, unit: str, path: str, detail: str) -> Finding:
    severity = SEVERITY[kind]
    if kind is K.LINK_REPLACED and detail.startswith("divergent"):
        severity = "critical"
    return Finding(kind, unit, path, severity, detail)


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


def check_missing(judge: Judge, obs: Observation, path: str, unit: str) -> Iterator[Finding]:
    expected = judge.exp.home_manager_links.get(path)
    if expected is not None:
        yield new_finding(
            K.MANAGED_MISSING,
            unit,
            path,
            f"Home Manager's current generation links this path to {expected.target}; it is absent",
        )
        return
    base = baseline_entry(judge.exp, path)
    if (
        base is not None
        and base.kind is FileKind.SYMLINK
        and is_under(base.resolved, judge.exp.managed_roots)
    ):
        yield new_finding(
            K.MANAGED_MISSING,
            unit,
            path,
            f"the accepted baseline had a managed link here to {base.target}; it is absent",
        )


@dataclass(frozen=True, slots=True)
class Place:
    """What a judged file is to its unit: where it sits, and what an unvouched one is called."""

    unit: str
    unmanaged: FindingKind
    where: str  # the start of an "unmanaged" detail
    user_tier: bool  # a file only the user should own
    can_mask: bool  # an empty file or a /dev/null link here masks the unit


def place_of(loc: Location) -> Place:
    return Place(
        loc.unit,
        K.UNMANAGED_DROPIN if loc.is_dropin else K.UNMANAGED_UNIT,
        f"a file in the {loc.unit_dir.tier.value} tier",
        loc.unit_dir.tier in USER_TIERS,
        # An empty or /dev/null drop-in masks only same-named drop-ins, never the unit itself.
        not loc.is_dropin,
    )


def check_owner_and_mode(
    judge: Judge, obs: Observation, place: Place, path: str, fact: FileFact
) -> Iterator[Finding]:
    unit = place.unit
    if in_linked_managed_dir(fact, judge.exp):
        return  # a read-only store file, root-owned by design: nobody rewrites it in place
    if place.user_tier and fact.uid is not None and fact.uid != obs.uid:
        what = "symlink" if fact.kind is FileKind.SYMLINK else "file"
        yield new_finding(
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
        yield new_finding(
            K.UNSAFE_MODE,
            unit,
            path,
            f"mode {fact.mode:04o}{via} lets {who} rewrite this unit definition",
        )


def check_expected(
    judge: Judge, obs: Observation, unit: str, path: str, fact: FileFact, expected: ExpectedLink
) -> Iterator[Finding]:
    if fact.masked:
        yield new_finding(
            K.MASKED, unit, path, "masked here, but Home Manager's current generation provides it"
        )
    elif through_expected_dir(fact, expected):
        return  # Home Manager linked the whole directory, and this is the file it holds
    elif fact.kind is FileKind.FILE:
        state = "latent" if fact.sha256 and fact.sha256 == expected.sha256 else "divergent"
        what = "same content as" if state == "latent" else "different content from"
        yield new_finding(
            K.LINK_REPLACED,
            unit,
            path,
            f"{state}: a regular file with {what} the managed target {expected.target} "
            f"(sha256 {_content(fact)}, expected {_short(expected.sha256)})",
        )
    elif fact.kind is FileKind.SYMLINK:
        if fact.dangling:
            yield new_finding(K.LINK_DANGLING, unit, path, _dangling_detail(fact))
        elif matches_expected(fact, expected):
            return
        elif (
            hm_dir := home_manager_files_dir(fact.target)
        ) and hm_dir != judge.exp.home_manager_files:
            yield new_finding(
                K.ORPHAN_LINK,
                unit,
                path,
                f"points into {hm_dir}, not the current generation's {judge.exp.home_manager_files}",
            )
        else:
            yield new_finding(
                K.LINK_RETARGETED,
                unit,
                path,
                f"resolves to {fact.resolved}, but Home Manager links it to {expected.target}",
            )
    else:
        yield new_finding(
            K.LINK_REPLACED,
            unit,
            path,
            f"divergent: a {fact.kind.value} where a managed link belongs",
        )


def check_unexpected(
    judge: Judge, obs: Observation, place: Place, path: str, fact: FileFact
) -> Iterator[Finding]:
    unit = place.unit
    base = baseline_entry(judge.exp, path)
    if (
        fact.masked
        and place.can_mask
        and (unit in judge.expected_units or (base is not None and not _base_masked(base)))
    ):
        yield new_finding(K.MASKED, unit, path, "masks a unit that is expected to be defined")
        return
    if fact.kind is FileKind.SYMLINK:
        yield from check_unexpected_link(judge, obs, place, path, fact, base)
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
            yield new_finding(
                K.LINK_REPLACED,
                unit,
                path,
                f"{state}: a regular file where the accepted baseline had a managed link to "
                f"{base.target}{_unread(fact)}",
            )
        elif base is not None and not fact.error:
            yield new_finding(
                place.unmanaged,
                unit,
                path,
                f"content changed since the accepted baseline (sha256 {_short(base.sha256)} → {_short(fact.sha256)})",
            )
        else:
            yield new_finding(
                place.unmanaged,
                unit,
                path,
                f"{place.where} that neither Home Manager, a managed root "
                f"nor the accepted baseline vouches for{_unread(fact)}",
            )


def _base_masked(base: BaselineEntry) -> bool:
    return base.resolved == "/dev/null"


def check_unexpected_link(
    judge: Judge,
    obs: Observation,
    place: Place,
    path: str,
    fact: FileFact,
    base: BaselineEntry | None,
) -> Iterator[Finding]:
    unit = place.unit
    vouched = base is not None and same_as_baseline(fact, base)
    if fact.dangling and not vouched:
        yield new_finding(K.LINK_DANGLING, unit, path, _dangling_detail(fact))
        return
    hm_dir = home_manager_files_dir(fact.target)
    if hm_dir is not None and hm_dir != judge.exp.home_manager_files:
        current = judge.exp.home_manager_files or "no current generation"
        yield new_finding(
            K.ORPHAN_LINK,
            unit,
            path,
            f"points into {hm_dir}, which is not the current Home Manager generation ({current})",
        )
        return
    if vouched or fact.dangling or is_under(fact.resolved, judge.exp.managed_roots):
        return
    if base is not None and base.kind is FileKind.SYMLINK:
        yield new_finding(
            K.LINK_RETARGETED,
            unit,
            path,
            f"resolves to {fact.resolved}, outside the managed roots; the accepted baseline had {base.target}",
        )
        return
    yield new_finding(
        place.unmanaged,
        unit,
        path,
        f"symlink to {fact.resolved}, outside the managed roots, and nothing vouches for it"
        f"{_unread(fact)}",
    )


def check_packaged(
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
        yield new_finding(
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
    yield new_finding(K.PACKAGE_MODIFIED, unit, path, detail)

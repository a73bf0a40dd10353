"""Who vouches for a file: the rules shared by the audit and ``provenanced show``.

A file is vouched for by Home Manager's current generation, by a managed root (the store), or by
the accepted baseline; a file of the vendor tier, by the package that installed it when a package
database is present. Anything else is nobody's, and the audit turns that into a finding.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Literal

from provenanced.model import (
    BaselineEntry,
    Expectations,
    ExpectedLink,
    FileFact,
    FileKind,
    HomeManagerGeneration,
    Owner,
    PackageIndex,
    frozen_map,
)

_HM_FILES_SUFFIX = "-home-manager-files"


def expectations(
    managed_roots: tuple[str, ...],
    generation: HomeManagerGeneration,
    baseline: Mapping[str, BaselineEntry],
    packages: PackageIndex | None = None,
) -> Expectations:
    """Everything that vouches for files, in one value: roots, generation, baseline, packages."""
    return Expectations(
        managed_roots=managed_roots,
        home_manager_generation=generation.path,
        home_manager_files=generation.home_files,
        home_manager_links=generation.links,
        baseline=frozen_map(baseline),
        packages=packages,
    )


def is_under(path: str | None, roots: Iterable[str]) -> bool:
    """Whether a resolved path lies inside one of the roots."""
    if not path:
        return False
    return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)


def home_manager_files_dir(target: str | None) -> str | None:
    """The ``…-home-manager-files`` store directory a link target points into, if any."""
    if not target:
        return None
    parts = target.split("/")
    for index, part in enumerate(parts):
        if part.endswith(_HM_FILES_SUFFIX):
            return "/".join(parts[: index + 1])
    return None


def vouch(path: str, fact: FileFact, exp: Expectations, tier_is_system: bool = False) -> Owner:
    """Who vouches for a file being what it is now (``NONE`` when nobody does)."""
    if exp.packages is not None and is_packaged(path, exp.packages):
        intact = package_state(path, fact, exp.packages) == "intact"
        return Owner.PACKAGE if intact else Owner.NONE
    if tier_is_system:
        return Owner.SYSTEM
    expected = exp.home_manager_links.get(path)
    if expected is not None and (
        (fact.kind is FileKind.SYMLINK and matches_expected(fact, expected))
        or through_expected_dir(fact, expected)
    ):
        return Owner.HOME_MANAGER
    if (
        fact.kind is FileKind.SYMLINK
        and not fact.dangling
        and is_under(fact.resolved, exp.managed_roots)
    ):
        hm_dir = home_manager_files_dir(fact.target)
        if hm_dir is None or hm_dir == exp.home_manager_files:
            return Owner.MANAGED_ROOT
    if in_linked_managed_dir(fact, exp):
        return Owner.MANAGED_ROOT
    base = baseline_entry(exp, path)
    if base is not None and same_as_baseline(fact, base):
        return Owner.BASELINE
    return Owner.NONE


def is_home_manager_link(target: str | None) -> bool:
    """Whether a link target points into a Home Manager generation's ``home-files``."""
    return home_manager_files_dir(target) is not None


def baseline_entry(exp: Expectations, path: str) -> BaselineEntry | None:
    """The accepted baseline's entry for ``path``, unless it recorded a Home Manager link.

    Home Manager is the authority for its links: the baseline neither vouches for one nor
    expects it back once a generation removed it.
    """
    base = exp.baseline.get(path)
    if base is None or (base.kind is FileKind.SYMLINK and is_home_manager_link(base.target)):
        return None
    return base


def through_expected_dir(fact: FileFact, expected: ExpectedLink) -> bool:
    """A regular file Home Manager placed by linking its whole directory (``recursive = false``)."""
    return (
        fact.kind is FileKind.FILE
        and fact.real_path is not None
        and fact.real_path == expected.resolved
    )


def in_linked_managed_dir(fact: FileFact, exp: Expectations) -> bool:
    """A file in a directory that is a link into a managed root (the store): managed as a whole."""
    return fact.kind is FileKind.FILE and is_under(fact.real_path, exp.managed_roots)


def in_managed_root(fact: FileFact, exp: Expectations) -> bool:
    """A file lying inside a managed root itself: a store file a generated unit names as source."""
    return fact.kind is FileKind.FILE and is_under(fact.real_path or fact.path, exp.managed_roots)


def matches_expected(fact: FileFact, expected: ExpectedLink) -> bool:
    """A link that reads as Home Manager's, or reaches the same store file another way."""
    # A link through an older generation's files resolves to the same store file but is orphaned.
    return fact.target == expected.target or (
        home_manager_files_dir(fact.target) is None
        and fact.resolved is not None
        and fact.resolved == expected.resolved
    )


def same_as_baseline(fact: FileFact, base: BaselineEntry) -> bool:
    """The file is what the accepted baseline recorded: the same link target, or the same content."""
    if fact.kind is not base.kind:
        return False
    if fact.kind is FileKind.SYMLINK:
        return fact.target == base.target
    if fact.error is not None:
        return False  # content not read (too large, unreadable): nothing can vouch for it
    # No hash and no error: a name the manager never reads, so only its presence counts.
    return fact.sha256 is None or fact.sha256 == base.sha256


PackageState = Literal["intact", "modified", "missing", "unowned"]


def is_packaged(path: str, index: PackageIndex) -> bool:
    """Whether ``path`` lies in a directory the package database speaks for (or one level down)."""
    parent = path.rpartition("/")[0]
    return parent in index.dirs or parent.rpartition("/")[0] in index.dirs


def package_state(path: str, fact: FileFact, index: PackageIndex) -> PackageState:
    """What the package database says of a file as it is now, the way ``dpkg --verify`` checks it.

    A recorded checksum means the package installed a regular file: anything else there, or other
    content, is a modification (dpkg src/main/verify.c, ``verify_file``). Without a checksum
    (a symlink) the database vouches only for the path being the package's.
    """
    entry = index.files.get(path)
    if entry is None:
        return "unowned"
    if fact.kind is FileKind.MISSING:
        return "missing"
    if not entry.digests:
        return "intact"
    if fact.kind is not FileKind.FILE:
        return "modified"
    if fact.sha256 is None and fact.error is None:
        return "intact"  # a name the manager never reads: its content cannot matter
    digest = fact.md5 if index.digest == "md5" else fact.sha256
    return "intact" if digest in entry.digests else "modified"

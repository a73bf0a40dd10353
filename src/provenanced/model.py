"""Plain immutable values shared by the core and the adapters: units, files, expectations, findings."""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Literal, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class Tier(StrEnum):
    """Which kind of unit directory a path lives in (informational, from the manager's UnitPath)."""

    CONTROL = "control"
    TRANSIENT = "transient"
    GENERATOR = "generator"
    CONFIG = "config"
    ADMIN = "admin"
    RUNTIME = "runtime"
    DATA = "data"
    VENDOR = "vendor"
    CUSTOM = "custom"


class FileKind(StrEnum):
    """What ``lstat`` says a path is."""

    FILE = "file"
    SYMLINK = "symlink"
    DIRECTORY = "directory"
    OTHER = "other"
    MISSING = "missing"


class Owner(StrEnum):
    """Who vouches for a file being what it is."""

    HOME_MANAGER = "home-manager"
    MANAGED_ROOT = "managed-root"
    BASELINE = "baseline"
    PACKAGE = "package"
    SYSTEM = "system"
    NONE = "none"


class FindingKind(StrEnum):
    """The drift kinds; stable identifiers used in JSON, metric labels and journald."""

    LINK_REPLACED = "link-replaced"
    LINK_RETARGETED = "link-retargeted"
    LINK_DANGLING = "link-dangling"
    MANAGED_MISSING = "managed-missing"
    ORPHAN_LINK = "orphan-link"
    UNMANAGED_UNIT = "unmanaged-unit"
    UNMANAGED_DROPIN = "unmanaged-dropin"
    SHADOWED = "shadowed"
    MASKED = "masked"
    STALE_LOAD = "stale-load"
    LOAD_ERROR = "load-error"
    JOB_UNVERIFIED = "job-unverified"
    FOREIGN_OWNER = "foreign-owner"
    UNSAFE_MODE = "unsafe-mode"
    PACKAGE_MODIFIED = "package-modified"
    PACKAGE_UNOWNED = "package-unowned"


# The largest unit file or drop-in provenanced hashes or has the manager load. systemd caps a
# line at LONG_LINE_MAX (1 MiB, src/basic/fileio.h) but not a file: config_parse()
# (src/shared/conf-parser.c) reads to the end, and a NUL ends a line (categorize_eol() in
# src/basic/fileio.c), so a sparse 1 GiB file is a billion lines. Real units are a few KiB.
UNIT_FILE_MAX = 1 << 20

Severity = Literal["critical", "warning", "info"]
SEVERITIES: tuple[Severity, ...] = ("critical", "warning", "info")


def frozen_map(items: Mapping[K, V] | None = None) -> Mapping[K, V]:
    """A read-only view of a private copy, so frozen values stay frozen."""
    return MappingProxyType(dict(items or {}))


@dataclass(frozen=True, slots=True)
class UnitRecord:
    """What the manager says about one loaded unit."""

    name: str
    load_state: str = "loaded"
    active_state: str = "inactive"
    sub_state: str = "dead"
    fragment_path: str = ""
    dropin_paths: tuple[str, ...] = ()
    source_path: str = ""
    need_daemon_reload: bool = False
    unit_file_state: str = ""
    invocation_id: str = ""

    @property
    def definition_paths(self) -> tuple[str, ...]:
        """The fragment followed by its drop-ins: the files that define the unit."""
        return ((self.fragment_path,) if self.fragment_path else ()) + self.dropin_paths


@dataclass(frozen=True, slots=True)
class FileFact:
    """What one path is on disk, read without following it for the link itself."""

    path: str
    kind: FileKind
    target: str | None = None
    resolved: str | None = None
    uid: int | None = None
    mode: int | None = None
    size: int | None = None
    sha256: str | None = None
    # Only for files a package database records by MD5 (dpkg): hashing every file twice costs.
    md5: str | None = None
    mtime_ns: int | None = None
    inode: int | None = None
    error: str | None = None
    # A regular file reached through a linked directory (Home Manager links a whole directory
    # when ``recursive = false``): where it really lies. None when no parent is a link.
    real_path: str | None = None

    @property
    def dangling(self) -> bool:
        """A symlink whose target does not exist (or cannot be resolved)."""
        return self.kind is FileKind.SYMLINK and self.resolved is None

    @property
    def oversized(self) -> bool:
        """A file, or a link's target, larger than any sane unit file (``UNIT_FILE_MAX``)."""
        return (
            self.kind in (FileKind.FILE, FileKind.SYMLINK)
            and self.size is not None
            and self.size > UNIT_FILE_MAX
        )

    @property
    def masked(self) -> bool:
        """A link to /dev/null or an empty file, which systemd reads as masked."""
        if self.kind is FileKind.SYMLINK:
            return self.resolved == "/dev/null" or (self.resolved is not None and self.size == 0)
        return self.kind is FileKind.FILE and self.size == 0


@dataclass(frozen=True, slots=True)
class UnitDir:
    """One directory of the manager's UnitPath, in priority order (0 is highest)."""

    path: str
    tier: Tier
    priority: int


@dataclass(frozen=True, slots=True)
class ExpectedLink:
    """A path Home Manager's current generation places as a symlink.

    ``target`` is what the link should read (``<home-files>/<relative path>``); ``resolved`` and
    ``sha256`` describe the content that target holds.
    """

    path: str
    target: str
    resolved: str | None
    sha256: str | None


@dataclass(frozen=True, slots=True)
class BaselineEntry:
    """What a path was when the baseline was accepted."""

    path: str
    kind: FileKind
    target: str | None
    resolved: str | None
    sha256: str | None


PackageDigest = Literal["md5", "sha256"]


@dataclass(frozen=True, slots=True)
class PackagedFile:
    """What the package database records for one file of the vendor tier.

    ``digests`` are the checksums its packages recorded (several when packages share the file);
    empty when none was recorded, as for a symlink: then only the ownership is vouched for.
    """

    path: str
    packages: tuple[str, ...]
    digests: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class PackageIndex:
    """The package database's word on the vendor unit directories it covers.

    A file in one of ``dirs`` is vouched for only by ``files``; vendor directories outside
    ``dirs`` (``/usr/local``, which no package may use) keep being vouched for by the system.
    """

    manager: str  # "dpkg"
    digest: PackageDigest
    dirs: frozenset[str]
    files: Mapping[str, PackagedFile] = field(default_factory=frozen_map)
    # A path the database diverts the packaged file away from: where the packaged file went.
    diverted: Mapping[str, str] = field(default_factory=frozen_map)


@dataclass(frozen=True, slots=True)
class Expectations:
    """Everything that vouches for files: Home Manager, managed roots, the baseline, packages."""

    managed_roots: tuple[str, ...] = ("/nix/store",)
    home_manager_generation: str | None = None
    home_manager_files: str | None = None
    home_manager_links: Mapping[str, ExpectedLink] = field(default_factory=frozen_map)
    baseline: Mapping[str, BaselineEntry] = field(default_factory=frozen_map)
    packages: PackageIndex | None = None  # None: no package database, the vendor tier as before


@dataclass(frozen=True, slots=True)
class HomeManagerGeneration:
    """Home Manager's current generation and the links it places under the unit directories."""

    path: str | None = None
    home_files: str | None = None
    links: Mapping[str, ExpectedLink] = field(default_factory=frozen_map)
    unit_dirs: tuple[str, ...] = ()  # the directories its links were listed for


@dataclass(frozen=True, slots=True)
class Observation:
    """One consistent look at the manager and the files behind its units."""

    units: Mapping[str, UnitRecord]
    facts: Mapping[str, FileFact]
    unit_dirs: tuple[UnitDir, ...]
    uid: int
    scanned_files: AbstractSet[str] = frozenset()
    loaded_hashes: Mapping[str, str] | None = None


@dataclass(frozen=True, slots=True)
class StartChecks:
    """The unit's last test of its ``Condition…=`` and ``Assert…=`` lines, and when it was.

    Timestamps are CLOCK_MONOTONIC microseconds; 0 means not tested since the unit was loaded
    (never started, or unloaded and loaded again), when the results read ``no`` by default.
    """

    condition_result: bool
    condition_timestamp: int
    assert_result: bool
    assert_timestamp: int


UNTESTED = StartChecks(False, 0, False, 0)


@dataclass(frozen=True, slots=True)
class JobChecks:
    """A unit's start checks from just before a job and the latest from after it."""

    before: StartChecks
    after: StartChecks


@dataclass(frozen=True, slots=True)
class ServiceResult:
    """What a unit says about its last run: the facts a job verification needs."""

    invocation_id: str
    result: str
    exec_main_code: int
    exec_main_status: int
    condition_result: bool
    assert_result: bool
    active_state: str
    sub_state: str
    condition_timestamp: int = 0  # CLOCK_MONOTONIC µs of the last test; 0: none since loaded
    assert_timestamp: int = 0

    @property
    def checks(self) -> StartChecks:
        """The start checks as read with the rest."""
        return StartChecks(
            self.condition_result,
            self.condition_timestamp,
            self.assert_result,
            self.assert_timestamp,
        )


@dataclass(frozen=True, slots=True)
class Finding:
    """One drift: identity is ``(kind, unit, path)``."""

    kind: FindingKind
    unit: str
    path: str
    severity: Severity
    detail: str
    since: float = 0.0

    @property
    def key(self) -> tuple[FindingKind, str, str]:
        """The identity that transitions are tracked by."""
        return (self.kind, self.unit, self.path)

    def to_json(self) -> dict[str, str]:
        """The stable JSON shape of ``audit --json`` and ``/api/v1/findings``."""
        return {
            "kind": self.kind.value,
            "unit": self.unit,
            "path": self.path,
            "severity": self.severity,
            "detail": self.detail,
        }


@dataclass(frozen=True, slots=True)
class Transition:
    """A finding that opened (``detected``) or closed (``resolved``)."""

    finding: Finding
    state: Literal["detected", "resolved"]


@dataclass(frozen=True, slots=True)
class DaemonStatus:
    """What the daemon publishes for the sinks: one immutable value, swapped whole."""

    findings: tuple[Finding, ...] = ()
    units_by_load_state: Mapping[str, int] = field(default_factory=frozen_map)
    manager_connected: bool = False
    transport: str = ""
    ready: bool = False
    behind: bool = False  # a re-read failed or the manager is gone: the findings may be out of date
    degraded: bool = False
    inotify_watches: int = 0
    last_full_resync: float = 0.0
    units_audited: int = 0
    activation_in_progress: bool = False  # a Home Manager activation holds the findings back
    activation_stuck: bool = False  # it outlived policy.activation_timeout and was judged

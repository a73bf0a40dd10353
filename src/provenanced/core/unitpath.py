"""Pure reasoning about the manager's unit search path: tiers, and which unit a file belongs to."""

from __future__ import annotations

import posixpath
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from provenanced.core.unitnames import DEPENDENCY_DIR_SUFFIXES, could_be_read_at
from provenanced.model import Tier, UnitDir

# Tiers whose files a user (or a tool acting for them) writes: audited for ownership and vouching.
USER_TIERS = frozenset({Tier.CONTROL, Tier.CONFIG, Tier.RUNTIME, Tier.DATA})
# Tiers scanned for unit files nothing vouches for: the user's plus admin and custom directories.
AUDITED_TIERS = USER_TIERS | {Tier.ADMIN, Tier.CUSTOM}
# Tiers whose content the system itself produces: vouched for by construction.
SYSTEM_TIERS = frozenset({Tier.VENDOR, Tier.GENERATOR, Tier.TRANSIENT})


@dataclass(frozen=True, slots=True)
class UserDirs:
    """The base directories a user manager derives its search path from."""

    home: str
    config_home: str
    data_home: str
    runtime_dir: str


def classify_dir(path: str, dirs: UserDirs, system_root: str = "/") -> Tier:
    """Name the tier of one UnitPath directory, as systemd's lookup-paths code lays them out.

    ``system_root`` is where a package manager installs (``dpkg --root``): its ``usr`` and
    ``lib`` are vendor directories too.
    """
    path = posixpath.normpath(path)
    runtime = posixpath.join(dirs.runtime_dir, "systemd")
    if path in (
        posixpath.join(dirs.config_home, "systemd/user.control"),
        posixpath.join(runtime, "user.control"),
    ):
        return Tier.CONTROL
    if path == posixpath.join(runtime, "transient"):
        return Tier.TRANSIENT
    if path.startswith(posixpath.join(runtime, "generator")):
        return Tier.GENERATOR
    if path == posixpath.join(dirs.config_home, "systemd/user"):
        return Tier.CONFIG
    if path in (posixpath.join(runtime, "user"), "/run/systemd/user"):
        return Tier.RUNTIME
    if path == posixpath.join(dirs.data_home, "systemd/user"):
        return Tier.DATA
    if path.endswith(("/etc/systemd/user", "/etc/xdg/systemd/user")):
        return Tier.ADMIN
    root = posixpath.normpath(system_root).rstrip("/")
    if path.startswith(("/usr/", "/lib/", f"{root}/usr/", f"{root}/lib/")):
        return Tier.VENDOR
    return Tier.CUSTOM


def build_unit_dirs(
    unit_path: Iterable[str], dirs: UserDirs, system_root: str = "/"
) -> tuple[UnitDir, ...]:
    """Turn the manager's UnitPath into tiered directories in priority order."""
    seen: set[str] = set()
    result: list[UnitDir] = []
    for path in unit_path:
        norm = posixpath.normpath(path)
        if norm not in seen:
            seen.add(norm)
            result.append(UnitDir(norm, classify_dir(norm, dirs, system_root), len(result)))
    return tuple(result)


def packaged_dirs(unit_dirs: Iterable[UnitDir], system_root: str = "/") -> tuple[str, ...]:
    """The vendor directories a package database can speak for: under its root, not ``usr/local``.

    Debian policy (9.1.2) keeps packages out of ``/usr/local``; the FHS gives it to the
    administrator, so nothing there is a package's, and an "unowned" finding would be noise.
    """
    root = posixpath.normpath(system_root).rstrip("/")
    local = f"{root}/usr/local/"
    return tuple(
        d.path
        for d in unit_dirs
        if d.tier is Tier.VENDOR
        and d.path.startswith(f"{root}/")
        and not (d.path + "/").startswith(local)
    )


@dataclass(frozen=True, slots=True)
class Location:
    """Where a file sits: its unit directory and its path relative to it."""

    unit_dir: UnitDir
    relative: str

    @property
    def unit(self) -> str:
        """The unit the file defines, extends or enables."""
        head, _, tail = self.relative.partition("/")
        if not tail:
            # A subdirectory itself (``foo.service.d``) stands for the unit it belongs to.
            for suffix in (".d", *DEPENDENCY_DIR_SUFFIXES):
                if head.endswith(suffix) and head != suffix:
                    return head[: -len(suffix)]
            return head
        if head.endswith(".d"):
            return head[:-2]
        return posixpath.basename(tail)

    @property
    def is_dropin(self) -> bool:
        """A ``<unit>.d/*.conf`` file rather than a unit file or an enablement link."""
        head, _, tail = self.relative.partition("/")
        return bool(tail) and head.endswith(".d")

    @property
    def could_be_read(self) -> bool:
        """Whether the manager could read this file at all, judging by its name and place."""
        return could_be_read_at(self.relative)

    @property
    def is_fragment(self) -> bool:
        """A unit file at the top of its directory."""
        return "/" not in self.relative


def locate(path: str, by_path: Mapping[str, UnitDir]) -> Location | None:
    """Find the unit directory a file lives in (directly, or one level down), if any."""
    # Plain string splits, not posixpath.relpath: this runs for every path of every audit.
    parent, _, name = path.rpartition("/")
    found = by_path.get(parent)
    if found is not None:
        return Location(found, name)
    grandparent, _, subdir = parent.rpartition("/")
    found = by_path.get(grandparent)
    if found is not None:
        return Location(found, f"{subdir}/{name}")
    return None

"""Where each file of one unit's definition comes from: the pure core of ``provenanced show``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from provenanced.core.sources import is_vendor_source
from provenanced.core.unitpath import SYSTEM_TIERS, locate
from provenanced.core.vouching import in_managed_root, vouch
from provenanced.model import (
    Expectations,
    FileFact,
    FileKind,
    Observation,
    Owner,
    UnitDir,
    UnitRecord,
)


@dataclass(frozen=True, slots=True)
class FileProvenance:
    """Where one file of a unit's definition comes from (a row of ``provenanced show``)."""

    path: str
    tier: str
    kind: str
    target: str | None
    owner: Owner
    sha256: str | None
    package: str | None = None  # the package(s) the database says installed it, vouched or not

    @property
    def owner_label(self) -> str:
        """The OWNER cell of ``show``: who vouches, with the package that installed the file."""
        if self.package is None:
            return self.owner.value
        if self.owner is Owner.PACKAGE:
            return f"package:{self.package}"
        return f"{self.owner.value} ({self.package}, modified)"

    def to_json(self) -> dict[str, str | None]:
        """The ``show --json`` shape of one file."""
        return {
            "path": self.path,
            "tier": self.tier,
            "kind": self.kind,
            "target": self.target,
            "owner": self.owner.value,
            "package": self.package,
            "sha256": self.sha256,
        }


@dataclass(frozen=True, slots=True)
class UnitProvenance:
    """A unit with its fragment and drop-ins in priority order, and the source it was made from."""

    unit: str
    load_state: str
    need_daemon_reload: bool
    fragment: FileProvenance | None
    dropins: tuple[FileProvenance, ...]
    source: FileProvenance | None = None

    def to_json(self) -> dict[str, object]:
        """The ``show --json`` shape of one unit."""
        return {
            "unit": self.unit,
            "load_state": self.load_state,
            "need_daemon_reload": self.need_daemon_reload,
            "fragment": self.fragment.to_json() if self.fragment else None,
            "dropins": [d.to_json() for d in self.dropins],
            "source": self.source.to_json() if self.source else None,
        }


def _file_provenance(
    path: str, obs: Observation, exp: Expectations, dirs: Mapping[str, UnitDir]
) -> FileProvenance:
    fact = obs.facts.get(path) or FileFact(path, FileKind.MISSING)
    loc = locate(path, dirs)
    tier = loc.unit_dir.tier if loc else None
    kind = "masked" if fact.masked or path == "/dev/null" else fact.kind.value
    owner = vouch(path, fact, exp, tier_is_system=tier in SYSTEM_TIERS)
    packaged = exp.packages.files.get(path) if exp.packages is not None else None
    return FileProvenance(
        path,
        tier.value if tier else "custom",
        kind,
        fact.target,
        owner,
        fact.sha256,
        ", ".join(packaged.packages) if packaged else None,
    )


def _source_provenance(path: str, obs: Observation, exp: Expectations) -> FileProvenance:
    fact = obs.facts.get(path) or FileFact(path, FileKind.MISSING)
    vendor = is_vendor_source(path)
    owner = vouch(path, fact, exp, tier_is_system=vendor)
    if owner is Owner.NONE and in_managed_root(fact, exp):
        owner = Owner.MANAGED_ROOT
    tier = "vendor" if vendor else "source"
    return FileProvenance(path, tier, fact.kind.value, fact.target, owner, fact.sha256)


def provenance_of(unit: UnitRecord, obs: Observation, exp: Expectations) -> UnitProvenance:
    """Where each piece of one unit's definition comes from."""
    dirs = {d.path: d for d in obs.unit_dirs}
    fragment = _file_provenance(unit.fragment_path, obs, exp, dirs) if unit.fragment_path else None
    dropins = tuple(_file_provenance(p, obs, exp, dirs) for p in unit.dropin_paths)
    source = _source_provenance(unit.source_path, obs, exp) if unit.source_path else None
    return UnitProvenance(
        unit.name, unit.load_state, unit.need_daemon_reload, fragment, dropins, source
    )

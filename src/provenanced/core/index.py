"""Which loaded units a changed path can affect: the index that keeps a change's cost local."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from provenanced.core.unitpath import locate
from provenanced.model import UnitDir, UnitRecord


@dataclass(slots=True)
class PathIndex:
    """Maps definition paths to the units they define, and unit names to loaded units."""

    by_path: dict[str, set[str]] = field(default_factory=dict)
    by_suffix: dict[str, set[str]] = field(default_factory=dict)

    @classmethod
    def build(cls, units: Iterable[UnitRecord]) -> PathIndex:
        """Index every unit's fragment, drop-ins and source path."""
        index = cls()
        for unit in units:
            index.add(unit)
        return index

    def add(self, unit: UnitRecord) -> None:
        """Index one unit (again)."""
        for path in (*unit.definition_paths, unit.source_path):
            if path:
                self.by_path.setdefault(path, set()).add(unit.name)
        self.by_suffix.setdefault(_suffix(unit.name), set()).add(unit.name)

    def remove(self, unit: UnitRecord) -> None:
        """Forget one unit."""
        for path in (*unit.definition_paths, unit.source_path):
            names = self.by_path.get(path)
            if names is not None:
                names.discard(unit.name)
                if not names:
                    del self.by_path[path]
        self.by_suffix.get(_suffix(unit.name), set()).discard(unit.name)

    def affected(self, path: str, dirs: Mapping[str, UnitDir]) -> set[str]:
        """Loaded units whose definition may change because ``path`` changed, plus the unit it names."""
        result = set(self.by_path.get(path, ()))
        loc = locate(path, dirs)
        if loc is not None:
            result.update(self.named_by(loc.unit))
        return result

    def named_by(self, name: str) -> set[str]:
        """Units a file or drop-in directory name applies to: itself, template instances, prefixes, a type."""
        if "." not in name:
            # A top-level drop-in directory such as ``service.d`` applies to every unit of that type.
            return set(self.by_suffix.get(name, ()))
        stem, _, suffix = name.rpartition(".")
        candidates = self.by_suffix.get(suffix, set())
        if stem.endswith("@"):
            return {u for u in candidates if u.startswith(stem)} | {name}
        if stem.endswith("-"):
            return {u for u in candidates if u.startswith(stem)}
        return {name}


def _suffix(name: str) -> str:
    return name.rpartition(".")[2]

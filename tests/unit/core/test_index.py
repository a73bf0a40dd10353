"""The path → units index keeps a change's cost to the units it can affect."""

from __future__ import annotations

import pytest

from provenanced.core.index import PathIndex
from provenanced.model import Tier, UnitDir, UnitRecord

CONFIG = "/h/.config/systemd/user"
DIRS = {CONFIG: UnitDir(CONFIG, Tier.CONFIG, 0)}
UNITS = [
    UnitRecord(
        "web.service",
        fragment_path=f"{CONFIG}/web.service",
        dropin_paths=(f"{CONFIG}/web.service.d/a.conf",),
    ),
    UnitRecord("app@one.service", fragment_path=f"{CONFIG}/app@.service"),
    UnitRecord("app@two.service", fragment_path=f"{CONFIG}/app@.service"),
    UnitRecord("pod-a-web.service"),
    UnitRecord("pod-b.service"),
    UnitRecord("backup.timer"),
]


class TestPathIndex:
    @pytest.mark.parametrize(
        ("path", "expected"),
        [
            (f"{CONFIG}/web.service", {"web.service"}),
            (f"{CONFIG}/web.service.d/a.conf", {"web.service"}),
            (f"{CONFIG}/web.service.d/new.conf", {"web.service"}),
            (
                f"{CONFIG}/app@.service.d/x.conf",
                {"app@one.service", "app@two.service", "app@.service"},
            ),
            (f"{CONFIG}/app@two.service.d/x.conf", {"app@two.service"}),
            (f"{CONFIG}/pod-.service.d/x.conf", {"pod-a-web.service", "pod-b.service"}),
            (f"{CONFIG}/pod-a-.service.d/x.conf", {"pod-a-web.service"}),
            (
                f"{CONFIG}/service.d/x.conf",
                {
                    "web.service",
                    "app@one.service",
                    "app@two.service",
                    "pod-a-web.service",
                    "pod-b.service",
                },
            ),
            (f"{CONFIG}/timers.target.wants/backup.timer", {"backup.timer"}),
            (f"{CONFIG}/new.service", {"new.service"}),
            ("/elsewhere/x.service", set()),
        ],
    )
    def test_affected(self, path: str, expected: set[str]) -> None:
        """Each kind of path maps to the units systemd would read it for, and no others."""
        assert PathIndex.build(UNITS).affected(path, DIRS) == expected

    def test_remove_forgets_paths(self) -> None:
        """A removed unit is no longer affected by its old fragment."""
        index = PathIndex.build(UNITS)
        index.remove(UNITS[0])
        assert index.affected(f"{CONFIG}/web.service.d/a.conf", DIRS) == {"web.service"}
        assert "web.service" not in index.by_path.get(f"{CONFIG}/web.service", set())

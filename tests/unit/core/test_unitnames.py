"""Which files the manager could read, judging by name and place alone."""

from __future__ import annotations

import pytest

from provenanced.core.unitnames import could_be_read_at


class TestCouldBeReadAt:
    @pytest.mark.parametrize(
        "relative",
        [
            "web.service",
            "web@.service",
            "web@a.service",
            "web.service.d",
            "web.service.d/10-env.conf",
            "service.d/10-all.conf",
            "default.target.wants",
            "default.target.wants/web.service",
            "web.service.requires/db.service",
            "web.service.upholds/db.service",
        ],
    )
    def test_units_dropins_and_links_are_read(self, relative: str) -> None:
        """Fragments, .conf drop-ins, enablement links and their directories reach the manager."""
        assert could_be_read_at(relative)

    @pytest.mark.parametrize(
        "relative",
        [
            "CuU5WPnS",
            "beta.service.backup",
            ".web.service.swp",
            "web.service~",
            "README",
            "web.service.d/10-env.conf~",
            "web.service.d/notes.txt",
            "default.target.wants/CuXyZ123",
            "default.target.wants/web.service.backup",
            "notes/web.service",
            "web.service.d/sub/10-env.conf",
        ],
    )
    def test_other_names_are_never_read(self, relative: str) -> None:
        """Temp links, backups, swap files and files in other folders never reach the manager."""
        assert not could_be_read_at(relative)

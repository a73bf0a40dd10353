"""The accepted baseline survives round trips and never half-writes."""

from __future__ import annotations

from pathlib import Path

import pytest

from provenanced.errors import StateError
from provenanced.expect.baseline import (
    baseline_stamp,
    entries_from_facts,
    load_baseline,
    save_baseline,
)
from provenanced.model import FileFact, FileKind


def facts() -> list[FileFact]:
    return [
        FileFact("/u/a.service", FileKind.FILE, sha256="aa"),
        FileFact(
            "/u/b.service",
            FileKind.SYMLINK,
            target="/nix/store/b",
            resolved="/nix/store/b",
            sha256="bb",
        ),
        FileFact("/u/gone.service", FileKind.MISSING),
    ]


class TestBaseline:
    def test_round_trip(self, tmp_path: Path) -> None:
        """What is saved loads back identical; missing files are not recorded."""
        entries = entries_from_facts(facts())
        save_baseline(str(tmp_path), entries)
        assert load_baseline(str(tmp_path)) == entries
        assert set(entries) == {"/u/a.service", "/u/b.service"}

    def test_home_manager_links_are_not_recorded(self) -> None:
        """A link into a generation's home-files is Home Manager's to expect, not the baseline's."""
        hm = FileFact(
            "/u/c.service",
            FileKind.SYMLINK,
            target="/nix/store/x-home-manager-files/.config/systemd/user/c.service",
            resolved="/nix/store/c",
        )
        assert set(entries_from_facts([*facts(), hm])) == {"/u/a.service", "/u/b.service"}

    def test_stamp_tells_versions_apart(self, tmp_path: Path) -> None:
        """The stamp holds while the file is untouched and changes with every save, same content or not."""
        assert baseline_stamp(str(tmp_path)) is None
        entries = entries_from_facts(facts())
        save_baseline(str(tmp_path), entries)
        first = baseline_stamp(str(tmp_path))
        assert first is not None and baseline_stamp(str(tmp_path)) == first
        save_baseline(str(tmp_path), entries)  # an atomic replace: a new inode
        assert baseline_stamp(str(tmp_path)) not in (None, first)

    def test_absent_is_none(self, tmp_path: Path) -> None:
        """No baseline yet is not an error."""
        assert load_baseline(str(tmp_path)) is None

    def test_malformed_is_a_clear_error(self, tmp_path: Path) -> None:
        """A corrupt baseline names the file and the way out."""
        (tmp_path / "baseline.json").write_text("{not json")
        with pytest.raises(StateError, match="baseline"):
            load_baseline(str(tmp_path))

    def test_does_not_follow_a_symlinked_baseline(self, tmp_path: Path) -> None:
        """Saving replaces a planted symlink itself and never writes through it."""
        victim = tmp_path / "victim"
        victim.write_text("precious")
        (tmp_path / "baseline.json").symlink_to(victim)
        save_baseline(str(tmp_path), entries_from_facts(facts()))
        assert victim.read_text() == "precious"
        assert not (tmp_path / "baseline.json").is_symlink()

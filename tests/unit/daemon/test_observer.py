"""The observer's pure helpers, against trees built in tmp_path: what it scans, loads and records."""

from __future__ import annotations

import os
from pathlib import Path

from provenanced.daemon.observer import (
    _as_before,
    _definition_candidates,
    baseline_facts,
    matches,
    scan_files,
    user_dirs,
)
from provenanced.model import (
    FileFact,
    FileKind,
    Observation,
    PackageIndex,
    Tier,
    UnitDir,
    UnitRecord,
    frozen_map,
)


def tree(tmp_path: Path) -> tuple[UnitDir, ...]:
    config = tmp_path / "config"
    (config / "web.service.d").mkdir(parents=True)
    (config / "web.service").write_text("[Service]\n")
    (config / "web.service.d" / "10-env.conf").write_text("[Service]\n")
    (config / "tpl@.service").write_text("[Service]\n")
    vendor = tmp_path / "vendor"
    vendor.mkdir()
    (vendor / "dbus.service").write_text("[Service]\n")
    return (UnitDir(str(config), Tier.CONFIG, 0), UnitDir(str(vendor), Tier.VENDOR, 1))


class TestUserDirs:
    def test_follows_the_xdg_variables(self) -> None:
        """Explicit XDG directories win over the defaults under HOME."""
        dirs = user_dirs({"HOME": "/h", "XDG_CONFIG_HOME": "/c", "XDG_RUNTIME_DIR": "/r"})
        assert (dirs.home, dirs.config_home, dirs.data_home, dirs.runtime_dir) == (
            "/h",
            "/c",
            "/h/.local/share",
            "/r",
        )

    def test_defaults_the_runtime_directory_by_uid(self) -> None:
        """Without XDG_RUNTIME_DIR the manager's runtime directory is /run/user/UID."""
        assert user_dirs({"HOME": "/h"}).runtime_dir == f"/run/user/{os.getuid()}"


class TestMatches:
    def test_no_patterns_match_everything(self) -> None:
        """An audit without patterns covers every unit."""
        assert matches("a.service", ())

    def test_shell_patterns_select_units(self) -> None:
        """Patterns are shell-style and case-sensitive."""
        assert matches("podman-web.service", ("podman-*",))
        assert not matches("Podman-web.service", ("podman-*",))


class TestScanFiles:
    def test_scans_the_audited_tiers_only(self, tmp_path: Path) -> None:
        """User tiers are scanned with their drop-ins; the vendor tier is not."""
        scanned = set(scan_files(tree(tmp_path)))
        config = tmp_path / "config"
        assert scanned == {
            str(config / "web.service"),
            str(config / "web.service.d" / "10-env.conf"),
            str(config / "tpl@.service"),
        }

    def test_scans_the_packaged_vendor_directories_too(self, tmp_path: Path) -> None:
        """A vendor directory a package database speaks for is scanned for its files."""
        dirs = tree(tmp_path)
        vendor = str(tmp_path / "vendor")
        assert str(tmp_path / "vendor" / "dbus.service") in scan_files(dirs, packaged=[vendor])


class TestDefinitionCandidates:
    def test_names_every_file_the_manager_would_read_for_a_unit(self, tmp_path: Path) -> None:
        """Its fragment in every directory, and the ``.conf`` drop-ins that exist."""
        dirs = tree(tmp_path)
        config, vendor = (tmp_path / "config"), (tmp_path / "vendor")
        assert set(_definition_candidates("web.service", dirs)) == {
            str(config / "web.service"),
            str(config / "web.service.d" / "10-env.conf"),
            str(vendor / "web.service"),
        }

    def test_an_instance_reads_its_template(self, tmp_path: Path) -> None:
        """Loading ``tpl@x.service`` reads ``tpl@.service`` too."""
        assert str(tmp_path / "config" / "tpl@.service") in set(
            _definition_candidates("tpl@x.service", tree(tmp_path))
        )


class TestAsBefore:
    def test_keeps_the_packaged_files_as_they_were_and_takes_the_rest(self) -> None:
        """Mid-run, the packaged directory is what the last look saw; other directories are new."""
        vendor, config = "/usr/lib/systemd/user", "/home/u/.config/systemd/user"
        dirs = (UnitDir(config, Tier.CONFIG, 0), UnitDir(vendor, Tier.VENDOR, 1))
        index = PackageIndex("dpkg", "md5", frozenset({vendor}))

        def look(*facts: FileFact) -> Observation:
            return Observation(
                units=frozen_map(),
                facts=frozen_map({f.path: f for f in facts}),
                unit_dirs=dirs,
                uid=0,
                scanned_files=frozenset(f.path for f in facts),
            )

        old_unit = FileFact(f"{vendor}/a.service", FileKind.FILE, sha256="old")
        new_unit = FileFact(f"{vendor}/a.service", FileKind.FILE, sha256="new")
        unpacked = FileFact(f"{vendor}/a.service.dpkg-tmp", FileKind.FILE, sha256="old")
        mine = FileFact(f"{config}/b.service", FileKind.FILE, sha256="mine")
        kept = _as_before(look(new_unit, unpacked, mine), look(old_unit), index)
        assert dict(kept.facts) == {old_unit.path: old_unit, mine.path: mine}
        assert kept.scanned_files == {old_unit.path, mine.path}


class TestBaselineFacts:
    def test_records_files_of_the_audited_tiers_only(self, tmp_path: Path) -> None:
        """A first baseline records the user's files, never vendor or unrelated paths."""
        dirs = tree(tmp_path)
        mine = str(tmp_path / "config" / "web.service")
        vendor = str(tmp_path / "vendor" / "dbus.service")
        facts = {p: FileFact(p, FileKind.FILE, sha256="s") for p in (mine, vendor, "/etc/x")}
        obs = Observation(units=frozen_map(), facts=frozen_map(facts), unit_dirs=dirs, uid=0)
        assert [f.path for f in baseline_facts(obs)] == [mine]

    def test_records_the_sources_of_loaded_units(self, tmp_path: Path) -> None:
        """A generated unit's source is recorded too, wherever it lies."""
        dirs = tree(tmp_path)
        source = str(tmp_path / "containers" / "web.container")
        unit = UnitRecord("web.service", source_path=source)
        facts = {p: FileFact(p, FileKind.FILE, sha256="s") for p in (source, "/etc/x")}
        obs = Observation(
            units=frozen_map({unit.name: unit}), facts=frozen_map(facts), unit_dirs=dirs, uid=0
        )
        assert [f.path for f in baseline_facts(obs)] == [source]

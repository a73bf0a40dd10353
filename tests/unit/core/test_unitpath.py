"""The unit search path: each directory's tier, and which unit a file in it belongs to."""

from __future__ import annotations

import pytest

from provenanced.core.unitpath import (
    Location,
    UserDirs,
    build_unit_dirs,
    classify_dir,
    locate,
    packaged_dirs,
)
from provenanced.model import Tier, UnitDir

HOME = "/home/u"
RUN = "/run/user/1000"
DIRS = UserDirs(
    home=HOME,
    config_home=f"{HOME}/.config",
    data_home=f"{HOME}/.local/share",
    runtime_dir=RUN,
)
# The UnitPath a systemd 252 user manager reports, in its order, when SYSTEMD_UNIT_PATH prepends
# /srv/units (systemd.unit(5), "User Unit Search Path").
UNIT_PATH = (
    ("/srv/units", Tier.CUSTOM),
    (f"{HOME}/.config/systemd/user.control", Tier.CONTROL),
    (f"{RUN}/systemd/user.control", Tier.CONTROL),
    (f"{RUN}/systemd/transient", Tier.TRANSIENT),
    (f"{RUN}/systemd/generator.early", Tier.GENERATOR),
    (f"{HOME}/.config/systemd/user", Tier.CONFIG),
    ("/etc/xdg/systemd/user", Tier.ADMIN),
    ("/etc/systemd/user", Tier.ADMIN),
    (f"{RUN}/systemd/user", Tier.RUNTIME),
    ("/run/systemd/user", Tier.RUNTIME),
    (f"{RUN}/systemd/generator", Tier.GENERATOR),
    (f"{HOME}/.local/share/systemd/user", Tier.DATA),
    ("/usr/local/share/systemd/user", Tier.VENDOR),
    ("/usr/share/systemd/user", Tier.VENDOR),
    ("/usr/local/lib/systemd/user", Tier.VENDOR),
    ("/usr/lib/systemd/user", Tier.VENDOR),
    (f"{RUN}/systemd/generator.late", Tier.GENERATOR),
)
CONFIG = UnitDir(f"{HOME}/.config/systemd/user", Tier.CONFIG, 5)
ADMIN = UnitDir("/etc/systemd/user", Tier.ADMIN, 7)
BY_PATH = {d.path: d for d in (CONFIG, ADMIN)}


class TestClassifyDir:
    @pytest.mark.parametrize(("path", "tier"), UNIT_PATH)
    def test_every_directory_of_a_real_unit_path(self, path: str, tier: Tier) -> None:
        """Each directory a user manager searches gets the tier systemd gives it."""
        assert classify_dir(path, DIRS) is tier

    @pytest.mark.parametrize(
        ("path", "tier"),
        [
            ("/lib/systemd/user", Tier.VENDOR),
            ("/tmp/sandbox/etc/systemd/user", Tier.ADMIN),
            (f"{HOME}/.config/systemd/user/", Tier.CONFIG),
            (f"{HOME}//.config/systemd/./user", Tier.CONFIG),
            (f"{HOME}/units", Tier.CUSTOM),
            ("/usrlocal/systemd/user", Tier.CUSTOM),
        ],
    )
    def test_other_spellings(self, path: str, tier: Tier) -> None:
        """Split-usr vendor dirs, a prefixed /etc, and unnormalised paths classify as their tier."""
        assert classify_dir(path, DIRS) is tier

    def test_follows_the_xdg_base_directories(self) -> None:
        """A relocated XDG_CONFIG_HOME and XDG_DATA_HOME move the config and data tiers with them."""
        dirs = UserDirs(home=HOME, config_home="/cfg", data_home="/data", runtime_dir=RUN)
        assert classify_dir("/cfg/systemd/user", dirs) is Tier.CONFIG
        assert classify_dir("/cfg/systemd/user.control", dirs) is Tier.CONTROL
        assert classify_dir("/data/systemd/user", dirs) is Tier.DATA
        assert classify_dir(f"{HOME}/.config/systemd/user", dirs) is Tier.CUSTOM


class TestBuildUnitDirs:
    def test_priority_follows_the_manager_order(self) -> None:
        """Directories keep the manager's order, numbered from 0 (highest), each with its tier."""
        built = build_unit_dirs([path for path, _ in UNIT_PATH], DIRS)
        assert built == tuple(
            UnitDir(path, tier, priority) for priority, (path, tier) in enumerate(UNIT_PATH)
        )

    def test_duplicates_keep_their_first_place(self) -> None:
        """A directory listed twice (also under another spelling) counts once, at its first place."""
        built = build_unit_dirs(
            ["/etc/systemd/user", f"{HOME}/.config/systemd/user", "/etc/systemd/user/"], DIRS
        )
        assert built == (
            UnitDir("/etc/systemd/user", Tier.ADMIN, 0),
            UnitDir(f"{HOME}/.config/systemd/user", Tier.CONFIG, 1),
        )

    def test_empty(self) -> None:
        """An empty UnitPath gives no directories."""
        assert build_unit_dirs([], DIRS) == ()


class TestLocation:
    @pytest.mark.parametrize(
        ("relative", "unit", "is_dropin", "is_fragment"),
        [
            ("web.service", "web.service", False, True),
            ("web@.service", "web@.service", False, True),
            ("web@8080.service", "web@8080.service", False, True),
            ("web.service.d/10-env.conf", "web.service", True, False),
            ("web@.service.d/10-env.conf", "web@.service", True, False),
            ("web-.service.d/10-env.conf", "web-.service", True, False),
            # Top-level drop-ins apply to every unit of the type (systemd.unit(5)).
            ("service.d/10-all.conf", "service", True, False),
            ("default.target.wants/web.service", "web.service", False, False),
            ("default.target.requires/web@8080.service", "web@8080.service", False, False),
            ("default.target.upholds/web.service", "web.service", False, False),
        ],
    )
    def test_files(self, relative: str, unit: str, is_dropin: bool, is_fragment: bool) -> None:
        """Fragments define, drop-ins extend, and .wants/.requires/.upholds links enable a unit."""
        location = Location(CONFIG, relative)
        assert (location.unit, location.is_dropin, location.is_fragment) == (
            unit,
            is_dropin,
            is_fragment,
        )

    @pytest.mark.parametrize(
        ("relative", "unit"),
        [
            ("web.service.d", "web.service"),
            ("service.d", "service"),
            ("default.target.wants", "default.target"),
            ("timers.target.requires", "timers.target"),
            ("default.target.upholds", "default.target"),
            (".d", ".d"),
            (".wants", ".wants"),
        ],
    )
    def test_subdirectories_stand_for_their_unit(self, relative: str, unit: str) -> None:
        """A drop-in or dependency directory itself names the unit it belongs to."""
        assert Location(CONFIG, relative).unit == unit


class TestLocate:
    @pytest.mark.parametrize(
        ("path", "expected"),
        [
            (f"{CONFIG.path}/web.service", Location(CONFIG, "web.service")),
            (
                f"{CONFIG.path}/web.service.d/10-env.conf",
                Location(CONFIG, "web.service.d/10-env.conf"),
            ),
            (
                f"{CONFIG.path}/default.target.wants/web.service",
                Location(CONFIG, "default.target.wants/web.service"),
            ),
            ("/etc/systemd/user/service.d/x.conf", Location(ADMIN, "service.d/x.conf")),
            (f"{CONFIG.path}/web.service.d/deeper/x.conf", None),
            (CONFIG.path, None),
            ("/tmp/web.service", None),
            (f"{HOME}/.config/systemd/user.control/web.service", None),
        ],
    )
    def test_one_or_two_levels_down(self, path: str, expected: Location | None) -> None:
        """A file directly in a unit directory or in one subdirectory is located; others are not."""
        assert locate(path, BY_PATH) == expected

    def test_the_nearer_directory_wins(self) -> None:
        """A file whose parent and grandparent are both unit directories belongs to its parent."""
        outer = UnitDir("/srv/units", Tier.CUSTOM, 0)
        inner = UnitDir("/srv/units/more", Tier.CUSTOM, 1)
        found = locate("/srv/units/more/x.service", {d.path: d for d in (outer, inner)})
        assert found == Location(inner, "x.service")


class TestClassifyDirUnderAPackageRoot:
    @pytest.mark.parametrize(
        "path",
        ["/usr/lib/systemd/user", "/lib/systemd/user", "/usr/local/lib/systemd/user"],
    )
    def test_usr_and_lib_are_the_vendor_tier(self, path: str) -> None:
        """What the distribution (or the administrator under /usr/local) installs."""
        assert classify_dir(path, DIRS) is Tier.VENDOR

    def test_a_package_root_has_vendor_directories_of_its_own(self) -> None:
        """Under a package manager's root (``dpkg --root``), usr/lib is vendor as well."""
        assert classify_dir("/srv/root/usr/lib/systemd/user", DIRS) is Tier.CUSTOM
        assert classify_dir("/srv/root/usr/lib/systemd/user", DIRS, "/srv/root") is Tier.VENDOR
        assert classify_dir("/usr/lib/systemd/user", DIRS, "/srv/root") is Tier.VENDOR


class TestPackagedDirs:
    def test_vendor_directories_except_usr_local(self) -> None:
        """No package installs under /usr/local: the administrator's, never package-judged."""
        unit_dirs = build_unit_dirs(
            [
                "/home/u/.config/systemd/user",
                "/etc/systemd/user",
                "/usr/local/share/systemd/user",
                "/usr/share/systemd/user",
                "/usr/local/lib/systemd/user",
                "/usr/lib/systemd/user",
            ],
            DIRS,
        )
        assert packaged_dirs(unit_dirs) == ("/usr/share/systemd/user", "/usr/lib/systemd/user")

    def test_only_those_under_the_package_root(self) -> None:
        """A database of another root says nothing about the host's /usr."""
        root = "/srv/root"
        unit_dirs = build_unit_dirs(
            [f"{root}/usr/lib/systemd/user", f"{root}/usr/local/lib/systemd/user", "/usr/lib/x"],
            DIRS,
            root,
        )
        assert packaged_dirs(unit_dirs, root) == (f"{root}/usr/lib/systemd/user",)

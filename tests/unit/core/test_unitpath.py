"""Tiers of the manager's search path, and which vendor directories a package database covers."""

from __future__ import annotations

import pytest

from provenanced.core.unitpath import UserDirs, build_unit_dirs, classify_dir, packaged_dirs
from provenanced.model import Tier

DIRS = UserDirs("/home/u", "/home/u/.config", "/home/u/.local/share", "/run/user/1000")


class TestClassifyDir:
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

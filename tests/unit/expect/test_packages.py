"""The dpkg database reader on fake database trees in tmp_path, laid out as dpkg writes them."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from provenanced.expect.packages import Dpkg, open_database
from provenanced.model import PackagedFile

VENDOR = "usr/lib/systemd/user"


class FakeDpkg:
    """A root with a dpkg database: ``info/*.list``, ``info/*.md5sums``, ``status``, ``diversions``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.admin = root / "var/lib/dpkg"
        (self.admin / "info").mkdir(parents=True)
        (self.admin / "updates").mkdir()
        (self.admin / "status").write_text("")
        (root / VENDOR).mkdir(parents=True)

    @property
    def vendor(self) -> str:
        return str(self.root / VENDOR)

    def install(self, package: str, files: dict[str, str], links: tuple[str, ...] = ()) -> None:
        """Place the files, and record them (and their directories) as dpkg does."""
        listed = {"/.", "/usr", "/usr/lib", "/usr/lib/systemd", f"/{VENDOR}"}
        sums = []
        for rel, content in files.items():
            path = self.root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content)
            listed.update({f"/{rel}", f"/{os.path.dirname(rel)}"})
            sums.append(f"{hashlib.md5(content.encode()).hexdigest()}  {rel}\n")
        listed.update(f"/{rel}" for rel in links)
        info = self.admin / "info"
        (info / f"{package}.list").write_text("".join(f"{p}\n" for p in sorted(listed)))
        (info / f"{package}.md5sums").write_text("".join(sums))


@pytest.fixture
def fake(tmp_path: Path) -> FakeDpkg:
    return FakeDpkg(tmp_path / "root")


def md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


class TestIndex:
    def test_owner_and_checksum_of_each_file_in_the_vendor_directory(self, fake: FakeDpkg) -> None:
        """Each packaged file under the directory is indexed with its package and its MD5."""
        fake.install("systemd", {f"{VENDOR}/app.slice": "[Slice]\n"})
        fake.install("other", {"usr/bin/tool": "#!/bin/sh\n"})
        index = Dpkg(str(fake.root)).index([fake.vendor])
        assert (index.manager, index.digest, index.dirs) == ("dpkg", "md5", {fake.vendor})
        assert dict(index.files) == {
            f"{fake.vendor}/app.slice": PackagedFile(
                f"{fake.vendor}/app.slice", ("systemd",), frozenset({md5("[Slice]\n")})
            )
        }

    def test_a_link_is_owned_without_a_checksum_and_directories_are_left_out(
        self, fake: FakeDpkg
    ) -> None:
        """dpkg records no MD5 for a symlink; a listed ``.wants`` directory is not a file."""
        fake.install(
            "dbus-user-session",
            {f"{VENDOR}/dbus.socket": "[Socket]\n"},
            links=(f"{VENDOR}/sockets.target.wants", f"{VENDOR}/sockets.target.wants/dbus.socket"),
        )
        files = Dpkg(str(fake.root)).index([fake.vendor]).files
        link = f"{fake.vendor}/sockets.target.wants/dbus.socket"
        assert files[link] == PackagedFile(link, ("dbus-user-session",))
        assert f"{fake.vendor}/sockets.target.wants" not in files

    def test_architecture_qualified_packages_keep_their_name(self, fake: FakeDpkg) -> None:
        """``info/<pkg>:<arch>.list`` is the package ``<pkg>:<arch>``, as ``dpkg -S`` names it."""
        fake.install("libfoo:amd64", {f"{VENDOR}/foo.service": "[Service]\n"})
        files = Dpkg(str(fake.root)).index([fake.vendor]).files
        assert files[f"{fake.vendor}/foo.service"].packages == ("libfoo:amd64",)

    def test_a_conffile_is_checked_against_the_md5_in_status(self, fake: FakeDpkg) -> None:
        """A conffile has no md5sums line: its MD5 is the one ``Conffiles:`` records."""
        body = "[Service]\n"
        fake.install("conf", {f"{VENDOR}/conf.service": body})
        (fake.admin / "info" / "conf.md5sums").write_text("")
        (fake.admin / "status").write_text(
            "Package: conf\nStatus: install ok installed\nConffiles:\n"
            f" /{VENDOR}/conf.service {md5(body)}\n"
            f" /{VENDOR}/gone.service newconffile\n"
            "Description: x\n\n"
        )
        files = Dpkg(str(fake.root)).index([fake.vendor]).files
        assert files[f"{fake.vendor}/conf.service"].digests == {md5(body)}

    def test_merged_usr_spellings_meet_in_the_managers_directory(self, tmp_path: Path) -> None:
        """A package listing ``/lib/systemd/user/x`` owns the ``/usr/lib/...`` file on merged /usr."""
        fake = FakeDpkg(tmp_path / "root")
        (fake.root / "lib").symlink_to("usr/lib")
        fake.install("old", {f"{VENDOR}/old.service": "[Service]\n"})
        listed = (fake.admin / "info" / "old.list").read_text()
        (fake.admin / "info" / "old.list").write_text(listed.replace("/usr/lib/", "/lib/"))
        sums = (fake.admin / "info" / "old.md5sums").read_text()
        (fake.admin / "info" / "old.md5sums").write_text(sums.replace("usr/lib/", "lib/"))
        files = Dpkg(str(fake.root)).index([fake.vendor]).files
        assert files[f"{fake.vendor}/old.service"].digests == {md5("[Service]\n")}

    def test_without_merged_usr_the_other_spelling_is_another_place(self, fake: FakeDpkg) -> None:
        """Where /lib is its own directory, ``/lib/systemd/user/x`` is not in /usr/lib."""
        (fake.root / "lib/systemd/user").mkdir(parents=True)
        fake.install("old", {"lib/systemd/user/old.service": "[Service]\n"})
        assert dict(Dpkg(str(fake.root)).index([fake.vendor]).files) == {}

    def test_a_diverted_file_is_owned_where_it_was_moved(self, fake: FakeDpkg) -> None:
        """``dpkg-divert`` moves other packages' file: its owner and MD5 follow it there."""
        fake.install("vendor", {f"{VENDOR}/web.service": "[Service]\n"})
        moved = f"/{VENDOR}/web.service.distrib"
        (fake.admin / "diversions").write_text(f"/{VENDOR}/web.service\n{moved}\n:\n")
        files = Dpkg(str(fake.root)).index([fake.vendor]).files
        assert f"{fake.vendor}/web.service" not in files
        assert files[f"{fake.vendor}/web.service.distrib"].packages == ("vendor",)
        index = Dpkg(str(fake.root)).index([fake.vendor])
        assert index.diverted == {f"{fake.vendor}/web.service": moved}

    def test_the_diverting_package_keeps_its_own_file(self, fake: FakeDpkg) -> None:
        """A diversion moves every package's file but the diverting package's own."""
        fake.install("diverter", {f"{VENDOR}/web.service": "[Service]\n"})
        (fake.admin / "diversions").write_text(
            f"/{VENDOR}/web.service\n/{VENDOR}/web.service.orig\ndiverter\n"
        )
        files = Dpkg(str(fake.root)).index([fake.vendor]).files
        assert files[f"{fake.vendor}/web.service"].packages == ("diverter",)

    def test_a_changed_database_is_read_again(self, fake: FakeDpkg) -> None:
        """A package installed, upgraded or removed shows in the next index of the same reader."""
        dpkg = Dpkg(str(fake.root))
        fake.install("a", {f"{VENDOR}/a.service": "1\n"})
        assert set(dpkg.index([fake.vendor]).files) == {f"{fake.vendor}/a.service"}
        before = dpkg.stamp()
        fake.install("a", {f"{VENDOR}/a.service": "2\n"})
        fake.install("b", {f"{VENDOR}/b.service": "1\n"})
        index = dpkg.index([fake.vendor])
        assert index.files[f"{fake.vendor}/a.service"].digests == {md5("2\n")}
        assert set(index.files) == {f"{fake.vendor}/a.service", f"{fake.vendor}/b.service"}
        (fake.admin / "info" / "a.list").unlink()
        assert set(dpkg.index([fake.vendor]).files) == {f"{fake.vendor}/b.service"}
        assert dpkg.stamp() != before

    def test_an_unreadable_database_raises(self, tmp_path: Path) -> None:
        """No info directory is an OSError for the caller, never an empty (all unowned) index."""
        with pytest.raises(FileNotFoundError):
            Dpkg(str(tmp_path)).index([str(tmp_path / VENDOR)])


class TestRun:
    def test_busy_while_the_update_journal_holds_entries(self, fake: FakeDpkg) -> None:
        """dpkg journals each step in ``updates/`` and empties it when the run's status is written."""
        dpkg = Dpkg(str(fake.root))
        assert not dpkg.busy()
        (fake.admin / "updates" / "0000").write_text("Package: a\n")
        assert dpkg.busy()

    def test_watches_the_files_that_change_at_the_end_of_a_run(self, fake: FakeDpkg) -> None:
        """The database directory, for status, diversions and the lock's last close."""
        assert Dpkg(str(fake.root)).watched == (
            str(fake.admin),
            frozenset({"status", "diversions", "lock"}),
        )


class TestOpenDatabase:
    def test_auto_finds_dpkg_where_its_status_file_is(self, fake: FakeDpkg, tmp_path: Path) -> None:
        """``auto`` picks dpkg when the root has a database, and nothing when it has none."""
        found = open_database("auto", str(fake.root))
        assert isinstance(found, Dpkg) and found.admindir == str(fake.admin)
        assert open_database("auto", str(tmp_path / "empty")) is None

    def test_none_turns_the_database_off(self, fake: FakeDpkg) -> None:
        """``none`` keeps the vendor tier trusted as shipped even where dpkg is present."""
        assert open_database("none", str(fake.root)) is None

"""FileFact reading on real temporary trees."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from provenanced.fs.facts import FactReader, Md5Reader, scan_unit_dir
from provenanced.model import UNIT_FILE_MAX, FileKind


class TestFactReader:
    def test_regular_file(self, tmp_path: Path) -> None:
        """A regular file reports its own uid, mode, size and content hash."""
        path = tmp_path / "a.service"
        path.write_bytes(b"[Unit]\n")
        path.chmod(0o640)
        fact = FactReader().read(str(path))
        assert fact.kind is FileKind.FILE
        assert (fact.mode, fact.size, fact.uid) == (0o640, 7, os.getuid())
        assert fact.sha256 == hashlib.sha256(b"[Unit]\n").hexdigest()

    def test_file_in_a_linked_directory_knows_where_it_lies(self, tmp_path: Path) -> None:
        """A file reached through a directory link carries its real path; others carry none."""
        store = tmp_path / "store" / "units"
        store.mkdir(parents=True)
        (store / "web.service").write_text("[Service]\n")
        (tmp_path / "user").symlink_to(store)
        reader = FactReader()
        linked = reader.read(str(tmp_path / "user" / "web.service"))
        assert linked.kind is FileKind.FILE
        assert linked.real_path == str(store.resolve() / "web.service")
        assert reader.read(str(store.resolve() / "web.service")).real_path is None

    def test_symlink_reports_target_content(self, tmp_path: Path) -> None:
        """A link reports what it reads, where it resolves and the content there."""
        target = tmp_path / "store-a.service"
        target.write_bytes(b"x")
        link = tmp_path / "a.service"
        link.symlink_to(target)
        fact = FactReader().read(str(link))
        assert (fact.kind, fact.target, fact.resolved) == (
            FileKind.SYMLINK,
            str(target),
            str(target),
        )
        assert fact.sha256 == hashlib.sha256(b"x").hexdigest()
        assert not fact.dangling

    def test_dangling_and_loop(self, tmp_path: Path) -> None:
        """Dangling links and link loops are facts, not exceptions."""
        (tmp_path / "d").symlink_to(tmp_path / "nowhere")
        (tmp_path / "l1").symlink_to(tmp_path / "l2")
        (tmp_path / "l2").symlink_to(tmp_path / "l1")
        reader = FactReader()
        assert reader.read(str(tmp_path / "d")).dangling
        loop = reader.read(str(tmp_path / "l1"))
        assert loop.kind is FileKind.SYMLINK and loop.resolved is None and loop.error

    def test_masked_forms(self, tmp_path: Path) -> None:
        """A link to /dev/null and an empty file both read as masked."""
        (tmp_path / "m").symlink_to("/dev/null")
        (tmp_path / "e").write_bytes(b"")
        reader = FactReader()
        assert reader.read(str(tmp_path / "m")).masked
        assert reader.read(str(tmp_path / "e")).masked

    def test_missing_and_fifo(self, tmp_path: Path) -> None:
        """A missing path is MISSING; a FIFO is OTHER and reading it never blocks."""
        os.mkfifo(tmp_path / "fifo")
        reader = FactReader()
        assert reader.read(str(tmp_path / "gone")).kind is FileKind.MISSING
        assert reader.read(str(tmp_path / "fifo")).kind is FileKind.OTHER

    def test_a_file_over_the_cap_is_not_read(self, tmp_path: Path) -> None:
        """A 16 GiB unit file (sparse) is a fact saying it is too large, with no hash."""
        path = tmp_path / "huge.service"
        path.touch()
        os.truncate(path, 16 << 30)
        fact = FactReader().read(str(path))
        assert (fact.kind, fact.size, fact.sha256) == (FileKind.FILE, 16 << 30, None)
        assert fact.oversized
        assert fact.error == f"too large to hash ({16 << 30} bytes > {UNIT_FILE_MAX})"

    def test_at_the_cap_is_hashed_and_a_link_to_a_huge_file_is_not(self, tmp_path: Path) -> None:
        """Exactly UNIT_FILE_MAX bytes is hashed; a link's target over the cap is not."""
        path = tmp_path / "full.service"
        path.write_bytes(b"#" * UNIT_FILE_MAX)
        reader = FactReader()
        assert reader.read(str(path)).sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
        huge = tmp_path / "store-huge"
        huge.touch()
        os.truncate(huge, UNIT_FILE_MAX + 1)
        (tmp_path / "l.service").symlink_to(huge)
        fact = reader.read(str(tmp_path / "l.service"))
        assert (fact.kind, fact.sha256, fact.oversized) == (FileKind.SYMLINK, None, True)
        assert fact.error is not None and "too large to hash" in fact.error

    def test_only_names_the_manager_reads_are_hashed(self, tmp_path: Path) -> None:
        """A file systemd never reads (no unit name, no .conf) is described but never hashed."""
        (tmp_path / "huge.img").write_bytes(b"x")
        (tmp_path / "a.conf").write_bytes(b"x")
        reader = FactReader()
        other = reader.read(str(tmp_path / "huge.img"))
        assert (other.kind, other.size, other.sha256, other.error) == (FileKind.FILE, 1, None, None)
        assert reader.read(str(tmp_path / "a.conf")).sha256 == hashlib.sha256(b"x").hexdigest()

    def test_a_unit_source_is_hashed_whatever_its_name(self, tmp_path: Path) -> None:
        """A quadlet source (``.container``) is hashed when read as a source, directly or linked."""
        source = tmp_path / "web.container"
        source.write_bytes(b"x")
        link = tmp_path / "linked.container"
        link.symlink_to(source)
        digest = hashlib.sha256(b"x").hexdigest()
        reader = FactReader()
        assert reader.read(str(source)).sha256 is None
        facts = reader.read_many([str(source), str(link)], sources={str(source), str(link)})
        assert [f.sha256 for f in facts.values()] == [digest, digest]

    def test_hash_cache_sees_rewrites(self, tmp_path: Path) -> None:
        """A rewritten file gets a new hash even from a reader that cached the old one."""
        path = tmp_path / "a.service"
        path.write_bytes(b"one")
        reader = FactReader()
        first = reader.read(str(path)).sha256
        path.write_bytes(b"two")
        assert reader.read(str(path)).sha256 != first


class TestMd5Reader:
    def test_md5_of_a_regular_file_as_dpkg_records_it(self, tmp_path: Path) -> None:
        """The MD5 a package database compares with, and a new one after a rewrite."""
        path = tmp_path / "a.service"
        path.write_bytes(b"[Unit]\n")
        reader = Md5Reader()
        assert reader.read(str(path)) == hashlib.md5(b"[Unit]\n").hexdigest()
        path.write_bytes(b"[Unit]\nDescription=x\n")
        assert reader.read(str(path)) == hashlib.md5(b"[Unit]\nDescription=x\n").hexdigest()

    def test_no_md5_past_the_unit_file_cap(self, tmp_path: Path) -> None:
        """A file over ``UNIT_FILE_MAX`` is not read to its end: it has no MD5."""
        path = tmp_path / "big.service"
        with path.open("wb") as handle:
            handle.truncate(UNIT_FILE_MAX + 1)
        assert Md5Reader().read(str(path)) is None

    def test_no_md5_for_a_link_a_fifo_or_nothing(self, tmp_path: Path) -> None:
        """A link is never followed, a FIFO never waited on, a missing file is no error."""
        (tmp_path / "target").write_bytes(b"x")
        (tmp_path / "link").symlink_to(tmp_path / "target")
        os.mkfifo(tmp_path / "fifo")
        reader = Md5Reader()
        assert [reader.read(str(tmp_path / n)) for n in ("link", "fifo", "gone")] == [None] * 3


class TestScan:
    def test_scan_lists_units_dropins_and_links_without_following(self, tmp_path: Path) -> None:
        """Unit files, drop-ins and .wants entries are listed; symlinked directories are not entered."""
        (tmp_path / "a.service").write_text("")
        (tmp_path / "a.service.d").mkdir()
        (tmp_path / "a.service.d" / "x.conf").write_text("")
        (tmp_path / "default.target.wants").mkdir()
        (tmp_path / "default.target.wants" / "a.service").symlink_to(tmp_path / "a.service")
        (tmp_path / "loop.service.d").symlink_to(tmp_path)
        found = sorted(os.path.relpath(p, tmp_path) for p in scan_unit_dir(str(tmp_path)))
        assert found == [
            "a.service",
            "a.service.d/x.conf",
            "default.target.wants/a.service",
            "loop.service.d",
        ]

"""Home Manager's current generation read from a fake store laid out as Home Manager builds it."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from provenanced.expect.generation import GCROOT, read_generation
from provenanced.fs.facts import FactReader
from provenanced.model import ExpectedLink, HomeManagerGeneration, Tier, UnitDir

UNITS = ".config/systemd/user"
FILES = {
    f"{UNITS}/web.service": "[Service]\nExecStart=/bin/web\n",
    f"{UNITS}/web.service.d/10-env.conf": "[Service]\nEnvironment=PORT=8080\n",
    f"{UNITS}/default.target.wants/web.service": "[Service]\nExecStart=/bin/web\n",
    ".config/git/config": "[user]\n",
}


@dataclass(frozen=True)
class FakeHome:
    """A HOME and a Nix store: ``<gen>/home-files`` → ``<hash>-home-manager-files/<rel>`` → store file."""

    home: Path
    store: Path

    def unit_dirs(self, *extra: str) -> tuple[UnitDir, ...]:
        paths = (str(self.home / UNITS), *extra)
        return tuple(UnitDir(path, Tier.CONFIG, n) for n, path in enumerate(paths))

    def generation(self, name: str, files: Mapping[str, str] = FILES) -> Path:
        """Build one generation: each file its own store path, linked from home-manager-files."""
        home_files = self.store / f"{name}-home-manager-files"
        for rel, content in files.items():
            source = self.store / f"{name}-{hashlib.sha256(rel.encode()).hexdigest()[:8]}"
            source.write_text(content)
            (home_files / rel).parent.mkdir(parents=True, exist_ok=True)
            (home_files / rel).symlink_to(source)
        generation = self.store / f"{name}-home-manager-generation"
        generation.mkdir()
        (generation / "home-files").symlink_to(home_files)
        return generation

    def activate(self, target: Path) -> None:
        """Point ``current-home`` at ``target`` the way activation does: a new link renamed over."""
        gcroot = self.home / GCROOT
        gcroot.parent.mkdir(parents=True, exist_ok=True)
        fresh = gcroot.with_name("new-home")
        fresh.symlink_to(target)
        fresh.rename(gcroot)

    def read(
        self, previous: HomeManagerGeneration | None = None, *extra: str
    ) -> HomeManagerGeneration:
        return read_generation(str(self.home), self.unit_dirs(*extra), FactReader(), previous)


@pytest.fixture
def tree(tmp_path: Path) -> FakeHome:
    root = tmp_path.resolve()
    (root / "home").mkdir()
    (root / "nix/store").mkdir(parents=True)
    return FakeHome(root / "home", root / "nix/store")


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class TestReadGeneration:
    def test_current_generation(self, tree: FakeHome) -> None:
        """Each file the generation places in a unit dir is expected to link to home-files/<rel>."""
        gen = tree.generation("aaaa")
        tree.activate(gen)
        home_files = tree.store / "aaaa-home-manager-files"
        found = tree.read()
        assert (found.path, found.home_files) == (str(gen), str(home_files))
        assert found.unit_dirs == (str(tree.home / UNITS),)
        expected = {
            str(tree.home / rel): ExpectedLink(
                str(tree.home / rel),
                str(home_files / rel),
                os.readlink(home_files / rel),
                _sha(content),
            )
            for rel, content in FILES.items()
            if rel.startswith(f"{UNITS}/")
        }
        assert len(expected) == 3
        assert found.links == expected

    def test_only_unit_directories_under_home(self, tree: FakeHome) -> None:
        """Files outside the unit dirs, and unit dirs outside HOME, contribute no links."""
        tree.activate(tree.generation("aaaa"))
        found = tree.read(None, str(tree.home.parent / "etc/systemd/user"))
        assert str(tree.home / ".config/git/config") not in found.links
        assert found.links == tree.read().links

    def test_a_linked_directory_is_one_link(self, tree: FakeHome) -> None:
        """A directory Home Manager links whole (recursive = false) is expected as one link."""
        gen = tree.generation("aaaa", {f"{UNITS}/web.service": "[Service]\n"})
        whole = tree.store / "bbbb-units"
        whole.mkdir()
        (whole / "db.service").write_text("[Service]\n")
        home_files = tree.store / "aaaa-home-manager-files"
        (home_files / UNITS / "db.service.d").symlink_to(whole)
        tree.activate(gen)
        link = tree.read().links[str(tree.home / UNITS / "db.service.d")]
        assert (link.target, link.resolved) == (
            str(home_files / UNITS / "db.service.d"),
            str(whole),
        )
        assert str(tree.home / UNITS / "db.service.d/db.service") not in tree.read().links

    def test_no_generation(self, tree: FakeHome) -> None:
        """Without a current-home gcroot nothing is expected."""
        assert tree.read() == HomeManagerGeneration()

    def test_dangling_gcroot(self, tree: FakeHome) -> None:
        """A gcroot whose generation was collected expects nothing, and does not raise."""
        tree.activate(tree.store / "gone-home-manager-generation")
        assert tree.read() == HomeManagerGeneration()

    def test_generation_without_home_files(self, tree: FakeHome) -> None:
        """A generation whose home-files link is missing or dangling expects nothing."""
        gen = tree.generation("aaaa")
        tree.activate(gen)
        (gen / "home-files").unlink()
        assert tree.read() == HomeManagerGeneration()
        (gen / "home-files").symlink_to(tree.store / "gone-home-manager-files")
        assert tree.read() == HomeManagerGeneration()

    def test_same_generation_is_kept(self, tree: FakeHome) -> None:
        """While the gcroot (even a new link) leads to the same store path, the last read is reused."""
        gen = tree.generation("aaaa")
        tree.activate(gen)
        first = tree.read()
        tree.activate(gen)
        assert tree.read(first) is first

    def test_a_new_generation_is_read(self, tree: FakeHome) -> None:
        """A gcroot moved to another generation is read afresh, whatever was read before."""
        tree.activate(tree.generation("aaaa"))
        first = tree.read()
        changed = {f"{UNITS}/web.service": "[Service]\nExecStart=/bin/web2\n"}
        second_gen = tree.generation("bbbb", changed)
        tree.activate(second_gen)
        second = tree.read(first)
        assert second.path == str(second_gen)
        assert set(second.links) == {str(tree.home / UNITS / "web.service")}
        assert second.links[str(tree.home / UNITS / "web.service")].sha256 == _sha(
            changed[f"{UNITS}/web.service"]
        )

    def test_other_unit_dirs_are_read_again(self, tree: FakeHome) -> None:
        """The same generation listed for a different set of unit dirs is read again."""
        tree.activate(tree.generation("aaaa"))
        first = tree.read()
        data = str(tree.home / ".local/share/systemd/user")
        again = tree.read(first, data)
        assert again is not first
        assert again.unit_dirs == (str(tree.home / UNITS), data)
        assert again.links == first.links


class TestSourceDirectories:
    def test_links_under_source_directories_are_expected_with_their_content(
        self, tmp_path: Path
    ) -> None:
        """A quadlet source Home Manager links is expected, hashed although not a unit name."""
        home = tmp_path / "home"
        generation = tmp_path / "store" / "gen"
        store_file = tmp_path / "store" / "aaaa-proxy.container"
        store_file.parent.mkdir(parents=True)
        store_file.write_bytes(b"[Container]\n")
        linked = generation / "home-files" / ".config/containers/systemd/proxy.container"
        linked.parent.mkdir(parents=True)
        linked.symlink_to(store_file)
        gcroot = home / GCROOT
        gcroot.parent.mkdir(parents=True)
        gcroot.symlink_to(generation)
        unit_dirs = (UnitDir(str(home / ".config/systemd/user"), Tier.CONFIG, 0),)
        source_dir = str(home / ".config/containers/systemd")
        path = os.path.join(source_dir, "proxy.container")
        without = read_generation(str(home), unit_dirs, FactReader())
        assert path not in without.links
        found = read_generation(str(home), unit_dirs, FactReader(), source_dirs=(source_dir,))
        assert found.links[path].resolved == str(store_file)
        assert found.links[path].sha256 == hashlib.sha256(b"[Container]\n").hexdigest()

"""Reading Home Manager's generation: the links it places in unit and source directories."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from provenanced.expect.generation import GCROOT, read_generation
from provenanced.fs.facts import FactReader
from provenanced.model import Tier, UnitDir


class TestReadGeneration:
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

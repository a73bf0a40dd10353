"""Read Home Manager's current generation: which paths it links, and what they should hold."""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterable, Sequence

from provenanced.fs.facts import FactReader
from provenanced.model import ExpectedLink, HomeManagerGeneration, UnitDir, frozen_map

GCROOT = ".local/state/home-manager/gcroots/current-home"


def read_generation(
    home: str,
    unit_dirs: Sequence[UnitDir],
    reader: FactReader,
    previous: HomeManagerGeneration | None = None,
    source_dirs: Sequence[str] = (),
) -> HomeManagerGeneration:
    """Follow the ``current-home`` gcroot and list what the generation links into unit dirs.

    ``source_dirs`` are listed too: generated units' sources (quadlet files) it may link.

    ``previous`` is returned as it is when the gcroot still leads to it: a store path never
    changes, so neither do the links it holds nor their content.
    """
    gcroot = posixpath.join(home, GCROOT)
    try:
        generation = os.path.realpath(gcroot, strict=True)
        # Home Manager links ``$HOME/<rel>`` to ``$(readlink -e <gen>/home-files)/<rel>``.
        home_files = os.path.realpath(posixpath.join(generation, "home-files"), strict=True)
    except OSError:
        return HomeManagerGeneration()
    dirs = (*(d.path for d in unit_dirs), *source_dirs)
    if previous is not None and (previous.path, previous.home_files, previous.unit_dirs) == (
        generation,
        home_files,
        dirs,
    ):
        return previous
    links: dict[str, ExpectedLink] = {}
    for directory in dirs:
        relative = posixpath.relpath(directory, home)
        if relative.startswith(".."):
            continue
        for source in _walk_files(posixpath.join(home_files, relative)):
            path = posixpath.join(home, posixpath.relpath(source, home_files))
            fact = reader.read(source, source=directory in source_dirs)
            links[path] = ExpectedLink(path, source, fact.resolved or None, fact.sha256)
    return HomeManagerGeneration(generation, home_files, frozen_map(links), dirs)


def _walk_files(root: str) -> Iterable[str]:
    for directory, subdirs, files in os.walk(root, followlinks=False):
        for name in files:
            yield posixpath.join(directory, name)
        # os.walk lists a symlink to a directory among subdirs; Home Manager links it like a file.
        for name in subdirs:
            path = posixpath.join(directory, name)
            if os.path.islink(path):
                yield path

"""Package databases: which package installed each file of the vendor unit directories, and its checksum.

Only dpkg is implemented (and tested against real dpkg). rpm keeps its database in a binary
store (sqlite or ndb) that only ``rpm`` itself reads reliably, and pacman's local database has
not been tried on a real Arch system: both are left out rather than shipped untested; a new one
implements ``PackageDatabase`` and joins ``open_database``.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from provenanced.core.unitnames import DEPENDENCY_DIR_SUFFIXES
from provenanced.model import PackagedFile, PackageDigest, PackageIndex, frozen_map

PackageManager = Literal["auto", "dpkg", "none"]

# The subdirectories of a unit directory whose entries systemd reads.
_UNIT_SUBDIRS = (".d", *DEPENDENCY_DIR_SUFFIXES)

_Stamp = tuple[int, int, int, int]


class PackageDatabase(Protocol):
    """A package manager's record of the files it installed, as far as the vendor tier needs it."""

    name: str
    digest: PackageDigest

    @property
    def watched(self) -> tuple[str, frozenset[str]]:
        """The directory whose entries change when the database does, and the names that matter."""
        ...

    def stamp(self) -> Hashable:
        """What tells one state of the database from the next, in a few ``stat`` calls."""
        ...

    def busy(self) -> bool:
        """Whether a run is under way: until it ends, its files and its records may disagree."""
        ...

    def index(self, dirs: Sequence[str]) -> PackageIndex:
        """Which package owns each file directly in (or one unit subdirectory below) ``dirs``.

        Raises OSError when the database cannot be read at all.
        """
        ...


def open_database(choice: PackageManager, root: str = "/") -> PackageDatabase | None:
    """The package database configured, or found under ``root`` for ``auto``; None for none."""
    if choice == "none":
        return None
    dpkg = Dpkg(root)
    if choice == "dpkg" or dpkg.present():
        return dpkg
    return None


@dataclass(frozen=True, slots=True)
class _Diversion:
    """``dpkg-divert``: other packages' file ``source`` is installed as ``target`` instead."""

    target: str
    by: str  # the diverting package (without architecture), or ":" for a local diversion


class Dpkg:
    """dpkg's database (``<root>/var/lib/dpkg``), read the way ``dpkg --verify`` reads it.

    ``info/<package>[:<arch>].list`` names every path a package installed (directories and
    symlinks included), ``info/<package>[:<arch>].md5sums`` holds ``<md5>  <path without the
    leading />`` for its regular files, ``status`` holds the MD5 of conffiles (which have no
    md5sums line), and ``diversions`` moves a packaged path elsewhere. Only the lines about the
    vendor unit directories are kept, and each file is read again only when it changed.
    """

    name = "dpkg"
    digest: PackageDigest = "md5"

    def __init__(self, root: str = "/", admindir: str | None = None) -> None:
        self.root = posixpath.normpath(root)
        self.admindir = admindir or posixpath.join(self.root, "var/lib/dpkg")
        self._info = posixpath.join(self.admindir, "info")
        self._needles: tuple[bytes, ...] = ()
        # Per info file: its stamp and the lines about the vendor directories (by ``_needles``).
        self._lists: dict[str, tuple[_Stamp, tuple[str, ...]]] = {}
        self._sums: dict[str, tuple[_Stamp, dict[str, str]]] = {}
        self._status: tuple[_Stamp | None, dict[str, set[str]]] = (None, {})

    def present(self) -> bool:
        """Whether a dpkg database exists under the root."""
        return posixpath.isfile(posixpath.join(self.admindir, "status"))

    @property
    def watched(self) -> tuple[str, frozenset[str]]:
        """``status`` and ``diversions`` are renamed into place; ``lock`` is closed at the very end.

        At the end of a run dpkg writes ``status``, then empties ``updates/``, then exits: the
        close of ``lock`` (opened for writing) is the first event after which it is not busy.
        """
        return self.admindir, frozenset({"status", "diversions", "lock"})

    def busy(self) -> bool:
        """dpkg journals every state change in ``updates/`` and empties it when its run ends.

        In between, a file it unpacked is in place before its md5sums line is (the old
        version's postrm runs between the two: dpkg src/main/unpack.c, process_archive()).
        """
        try:
            with os.scandir(posixpath.join(self.admindir, "updates")) as entries:
                return any(True for _ in entries)
        except OSError:
            return False

    def stamp(self) -> Hashable:
        """The info directory (every info file is replaced by rename), ``status``, ``diversions``."""
        return tuple(
            _stamp(posixpath.join(self.admindir, name)) for name in ("info", "status", "diversions")
        )

    def index(self, dirs: Sequence[str]) -> PackageIndex:
        """The packaged files of ``dirs``, each under the spelling the manager uses for its dir."""
        aliases = self._aliases(dirs)
        diversions = self._diversions()
        # A diversion can bring another package's file into the vendor directories from elsewhere.
        moved_in = [s for s, d in diversions.items() if _on_disk(d.target, aliases)]
        needles = tuple(
            sorted({*(f"{a}/".encode() for a in aliases), *(os.fsencode(s) for s in moved_in)})
        )
        if needles != self._needles:
            self._needles, self._lists, self._sums = needles, {}, {}
            self._status = (None, {})
        owners: dict[str, list[str]] = {}
        digests: dict[str, set[str]] = {}
        for package, listed in self._listed().items():
            sums = self._md5sums(package) if listed else {}
            for path in listed:
                diversion = diversions.get(path)
                used = path
                if diversion is not None and diversion.by != package.partition(":")[0]:
                    used = diversion.target  # dpkg src/main/help.c, namenodetouse()
                for place in _on_disk(used, aliases):
                    owners.setdefault(place, []).append(package)
                    if path in sums:
                        digests.setdefault(place, set()).add(sums[path])
        for path, hashes in self._conffiles().items():
            for place in _on_disk(path, aliases):
                if place in owners:
                    digests.setdefault(place, set()).update(hashes)
        # A listed directory (a ``.wants`` one) is a parent of other entries; only files count.
        parents = {path.rpartition("/")[0] for path in owners}
        files = {
            path: PackagedFile(path, tuple(sorted(packages)), frozenset(digests.get(path, ())))
            for path, packages in owners.items()
            if path not in parents
        }
        diverted = {
            place: diversion.target
            for source, diversion in diversions.items()
            for place in _on_disk(source, aliases)
        }
        return PackageIndex(
            self.name, self.digest, frozenset(dirs), frozen_map(files), frozen_map(diverted)
        )

    def _aliases(self, dirs: Sequence[str]) -> dict[str, list[str]]:
        """Each spelling dpkg may list a vendor directory under, with the directories it means.

        With merged /usr, ``/lib`` links to ``usr/lib``: a package may list
        ``/lib/systemd/user/x`` for the file the manager finds as ``/usr/lib/systemd/user/x``
        (dpkg itself does not see through it: ``dpkg -S`` answers for one spelling only).
        """
        aliases: dict[str, list[str]] = {}
        for directory in dirs:
            relative = "/" + posixpath.relpath(directory, self.root)
            if relative.startswith("/.."):
                continue
            other = relative[4:] if relative.startswith("/usr/") else "/usr" + relative
            real = os.path.realpath(directory)
            for spelling in (relative, other):
                on_disk = posixpath.join(self.root, spelling.lstrip("/"))
                if spelling == relative or os.path.realpath(on_disk) == real:
                    aliases.setdefault(spelling, []).append(directory)
        return aliases

    def _diversions(self) -> dict[str, _Diversion]:
        """``diversions``: three lines per diversion (source, target, package or ``:``)."""
        try:
            with open(posixpath.join(self.admindir, "diversions"), "rb") as handle:
                lines = os.fsdecode(handle.read()).splitlines()
        except FileNotFoundError:
            return {}
        return {
            lines[i]: _Diversion(lines[i + 1], lines[i + 2]) for i in range(0, len(lines) - 2, 3)
        }

    def _listed(self) -> dict[str, tuple[str, ...]]:
        """Per package, the paths of its ``.list`` that may concern the vendor directories."""
        result: dict[str, tuple[str, ...]] = {}
        seen: set[str] = set()
        with os.scandir(self._info) as entries:
            for entry in entries:
                if not entry.name.endswith(".list"):
                    continue
                package = entry.name[: -len(".list")]
                seen.add(package)
                stamp = _entry_stamp(entry)
                cached = self._lists.get(package)
                if cached is None or cached[0] != stamp:
                    cached = (stamp, self._matching_lines(entry.path))
                    self._lists[package] = cached
                result[package] = cached[1]
        for gone in set(self._lists) - seen:
            del self._lists[gone]
            self._sums.pop(gone, None)
        return result

    def _matching_lines(self, path: str) -> tuple[str, ...]:
        try:
            with open(path, "rb") as handle:
                data = handle.read()
        except OSError:
            return ()
        # Most packages install nothing there: one substring test spares splitting their lists.
        if not any(needle in data for needle in self._needles):
            return ()
        return tuple(
            os.fsdecode(line) for line in data.split(b"\n") if line.startswith(self._needles)
        )

    def _md5sums(self, package: str) -> dict[str, str]:
        path = posixpath.join(self._info, f"{package}.md5sums")
        try:
            stamp = _stamp_or_raise(path)
        except OSError:
            return {}  # packages built without md5sums exist; their files are owned, unverified
        cached = self._sums.get(package)
        if cached is None or cached[0] != stamp:
            cached = (stamp, self._read_md5sums(path))
            self._sums[package] = cached
        return cached[1]

    def _read_md5sums(self, path: str) -> dict[str, str]:
        try:
            with open(path, "rb") as handle:
                data = handle.read()
        except OSError:
            return {}
        wanted = tuple(needle.removeprefix(b"/") for needle in self._needles)
        sums = {}
        for line in data.split(b"\n"):
            digest, _, name = line.partition(b"  ")
            if name.startswith(wanted):
                sums["/" + os.fsdecode(name)] = digest.decode("ascii", "replace")
        return sums

    def _conffiles(self) -> dict[str, set[str]]:
        """The MD5s ``status`` records for conffiles (``Conffiles:`` lines ``<path> <md5> …``)."""
        path = posixpath.join(self.admindir, "status")
        stamp = _stamp(path)
        if stamp is not None and stamp == self._status[0]:
            return self._status[1]
        try:
            with open(path, "rb") as handle:
                data = handle.read()
        except OSError:
            data = b""
        found: dict[str, set[str]] = {}
        for stanza in data.split(b"\n\n"):
            if b"\nConffiles:" not in stanza or not any(n in stanza for n in self._needles):
                continue
            for name, digest in _conffile_lines(stanza):
                if name.startswith(self._needles):
                    found.setdefault(os.fsdecode(name), set()).add(digest)
        self._status = (stamp, found)
        return found


def _conffile_lines(stanza: bytes) -> Iterable[tuple[bytes, str]]:
    lines = iter(stanza.split(b"\n"))
    for line in lines:
        if line.startswith(b"Conffiles:"):
            break
    for line in lines:
        if not line.startswith(b" "):
            return
        fields = line.split()
        # A new conffile not yet configured carries the word "newconffile", not a digest.
        if len(fields) >= 2 and len(fields[1]) == 32:
            yield fields[0], fields[1].decode("ascii", "replace")


def _on_disk(path: str, aliases: Mapping[str, list[str]]) -> list[str]:
    """Where a packaged path lies as the manager spells it: in a vendor dir or a unit subdir."""
    parent, _, name = path.rpartition("/")
    if parent in aliases:
        return [f"{d}/{name}" for d in aliases[parent]]
    grandparent, _, subdir = parent.rpartition("/")
    if grandparent in aliases and subdir.endswith(_UNIT_SUBDIRS):
        return [f"{d}/{subdir}/{name}" for d in aliases[grandparent]]
    return []


def _stamp_or_raise(path: str) -> _Stamp:
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _stamp(path: str) -> _Stamp | None:
    try:
        return _stamp_or_raise(path)
    except OSError:
        return None


def _entry_stamp(entry: os.DirEntry[str]) -> _Stamp:
    try:
        st = entry.stat(follow_symlinks=False)
    except OSError:
        return (0, 0, 0, 0)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

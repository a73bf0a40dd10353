"""Read what a path is on disk (``FileFact``) without ever writing or following the link itself."""

from __future__ import annotations

import errno
import hashlib
import os
import posixpath
import stat
from collections.abc import Collection, Iterable, Iterator
from dataclasses import replace

from provenanced.model import UNIT_FILE_MAX, FileFact, FileKind
from provenanced.systemd.names import could_define_unit

_CHUNK = 1 << 16
# Opening a FIFO or device must not block the reader; O_NOFOLLOW refuses a swapped-in link.
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
# Unit-file subdirectories whose entries systemd reads.
_SUBDIR_SUFFIXES = (".d", ".wants", ".requires", ".upholds")

_HashKey = tuple[int, int, int, int, int]


class FactReader:
    """Reads ``FileFact``s, caching content hashes by inode identity so unchanged files hash once.

    Only what the manager could read as a unit file or drop-in (or a generator as a unit's
    source) is hashed, and at most ``UNIT_FILE_MAX`` bytes of it: a larger file is a fact with
    ``error`` saying so.
    """

    def __init__(self) -> None:
        self._hashes: dict[str, tuple[_HashKey, str]] = {}

    def read(self, path: str, source: bool = False) -> FileFact:
        """What ``path`` is now; errors become a fact with ``error`` set, never an exception.

        ``source``: a generated unit's source (a ``.container`` file), hashed whatever its name.
        """
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return FileFact(path, FileKind.MISSING)
        except NotADirectoryError:
            return FileFact(path, FileKind.MISSING, error="a parent is not a directory")
        except OSError as exc:
            return FileFact(path, FileKind.MISSING, error=_error_text(exc))
        if stat.S_ISLNK(st.st_mode):
            return self._read_link(path, st, source)
        if stat.S_ISREG(st.st_mode):
            sha, error = self._hash(path, path, st, source)
            fact = _fact(path, FileKind.FILE, st, st, sha=sha, error=error)
            real = _real_path(path)
            return fact if real is None else replace(fact, real_path=real)
        kind = FileKind.DIRECTORY if stat.S_ISDIR(st.st_mode) else FileKind.OTHER
        return _fact(path, kind, st, st)

    def read_many(self, paths: Iterable[str], sources: Collection[str] = ()) -> dict[str, FileFact]:
        """Facts for many paths, keyed by path (``sources``: those to hash as unit sources)."""
        return {path: self.read(path, path in sources) for path in paths}

    def _read_link(self, path: str, st: os.stat_result, source: bool) -> FileFact:
        try:
            target = os.readlink(path)
        except OSError as exc:
            return _fact(path, FileKind.SYMLINK, st, None, error=_error_text(exc))
        try:
            resolved, target_st = _resolve(path)
        except OSError as exc:
            dangling = exc.errno in (errno.ENOENT, errno.ENOTDIR)
            error = None if dangling else _error_text(exc)
            return _fact(path, FileKind.SYMLINK, st, None, target=target, error=error)
        sha, error = (None, None)
        if stat.S_ISREG(target_st.st_mode):
            sha, error = self._hash(path, resolved, target_st, source)
        return _fact(
            path,
            FileKind.SYMLINK,
            st,
            target_st,
            target=target,
            resolved=resolved,
            sha=sha,
            error=error,
        )

    def _hash(
        self, name: str, path: str, st: os.stat_result, source: bool
    ) -> tuple[str | None, str | None]:
        """The content hash of ``path`` (``name`` is the path as found, a link's own)."""
        if not source and not could_define_unit(name):
            return None, None  # the manager never reads it, so its content cannot matter
        if st.st_size > UNIT_FILE_MAX:
            return None, f"too large to hash ({st.st_size} bytes > {UNIT_FILE_MAX})"
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        cached = self._hashes.get(path)
        if cached is not None and cached[0] == key:
            return cached[1], None
        try:
            sha = _sha256(path)
        except OSError as exc:
            return None, _error_text(exc)
        if sha is None:
            return None, f"too large to hash (grew past {UNIT_FILE_MAX} bytes while read)"
        self._hashes[path] = (key, sha)
        return sha, None


def _fact(
    path: str,
    kind: FileKind,
    st: os.stat_result,
    content_st: os.stat_result | None,
    *,
    target: str | None = None,
    resolved: str | None = None,
    sha: str | None = None,
    error: str | None = None,
) -> FileFact:
    # A link's own mode is always 0777; what can be rewritten is its target, so report that mode.
    return FileFact(
        path=path,
        kind=kind,
        target=target,
        resolved=resolved if kind is FileKind.SYMLINK else None,
        uid=st.st_uid,
        mode=stat.S_IMODE(content_st.st_mode) if content_st else None,
        size=content_st.st_size if content_st else None,
        sha256=sha,
        mtime_ns=st.st_mtime_ns,
        inode=st.st_ino,
        error=error,
    )


def _sha256(path: str) -> str | None:
    """The hash of at most ``UNIT_FILE_MAX`` bytes; None when the file holds more (it grew)."""
    fd = os.open(path, _OPEN_FLAGS)
    try:
        digest = hashlib.sha256()
        left = UNIT_FILE_MAX + 1
        while left and (chunk := os.read(fd, min(_CHUNK, left))):
            digest.update(chunk)
            left -= len(chunk)
        return digest.hexdigest() if left else None
    finally:
        os.close(fd)


def _resolve(path: str) -> tuple[str, os.stat_result]:
    """Where a link finally leads, and that file's stat, as the kernel resolves it.

    The kernel walks the chain (ELOOP past 40 links, as the manager sees it) in three syscalls;
    ``realpath`` costs an ``lstat`` per path component, about 15 for a store path.
    """
    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        return _opened_path(fd, path), os.fstat(fd)
    finally:
        os.close(fd)


def _real_path(path: str) -> str | None:
    """Where a regular file really lies when a parent directory is a link; None otherwise."""
    directory, name = posixpath.split(path)
    try:
        fd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            real = _opened_path(fd, directory)
        finally:
            os.close(fd)
    except OSError:
        return None
    return None if real == directory else posixpath.join(real, name)


def _opened_path(fd: int, path: str) -> str:
    """The canonical path of an open file, as the kernel knows it."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except FileNotFoundError:  # no /proc mounted here
        return os.path.realpath(path, strict=True)


def _error_text(exc: OSError) -> str:
    return exc.strerror or str(exc)


def scan_unit_dir(directory: str) -> Iterator[str]:
    """Every unit file, drop-in and enablement link in one unit directory, never following links."""
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return
    except OSError:
        # Unreadable directories are reported by their own fact, not by aborting the scan.
        return
    for entry in entries:
        if entry.name.endswith(_SUBDIR_SUFFIXES) and entry.is_dir(follow_symlinks=False):
            try:
                with os.scandir(entry.path) as inner:
                    yield from (sub.path for sub in inner if not sub.is_dir(follow_symlinks=False))
            except OSError:
                continue
        elif not entry.is_dir(follow_symlinks=False):
            yield entry.path


class Md5Reader:
    """MD5s of regular files, what dpkg records per file; cached by identity like the sha256s.

    Apart from ``FactReader`` on purpose: only the files a package database checks pay for it.
    At most ``UNIT_FILE_MAX`` bytes are read, as for the sha256s: a larger file has no MD5.
    """

    def __init__(self) -> None:
        self._hashes: dict[str, tuple[_HashKey, str]] = {}

    def read(self, path: str) -> str | None:
        """The MD5 of the regular file at ``path``; None for a link, a non-file or an error."""
        try:
            fd = os.open(path, _OPEN_FLAGS)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return None
            key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            cached = self._hashes.get(path)
            if cached is not None and cached[0] == key:
                return cached[1]
            digest = hashlib.md5(usedforsecurity=False)
            left = UNIT_FILE_MAX + 1
            while left and (chunk := os.read(fd, min(_CHUNK, left))):
                digest.update(chunk)
                left -= len(chunk)
        except OSError:
            return None
        finally:
            os.close(fd)
        if not left:
            return None  # over the cap: what the manager would refuse to read is no unit file
        self._hashes[path] = (key, digest.hexdigest())
        return digest.hexdigest()

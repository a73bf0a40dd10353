"""Moving a user's file into quarantine: only as it was examined, durable before the original goes."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import posixpath
import secrets
import stat
from dataclasses import dataclass

from provenanced.fs import atomic, writers
from provenanced.model import FileFact, FileKind

# Opening a FIFO must not block; O_NOFOLLOW refuses a link swapped in meanwhile.
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_CHUNK = 1 << 16


class QuarantineError(Exception):
    """The file was not moved; it is where it was, unless the message says otherwise."""


class BusyError(QuarantineError):
    """Someone writes the file (or wrote it since it was examined); it was left in place."""


def being_written(path: str, inode: int) -> bool:
    """Whether any process holds the regular file at ``path`` (inode ``inode``) open for writing."""
    try:
        fd = os.open(path, _READ_FLAGS)
    except BlockingIOError:  # another process holds a write lease on it
        return True
    try:
        return os.fstat(fd).st_ino == inode and _open_for_writing(fd, path)
    finally:
        os.close(fd)


def move_into(path: str, destination: str, examined: FileFact, durable_from: str) -> str | None:
    """Move ``path`` to ``destination`` if it is still exactly ``examined``.

    Returns the hash of the quarantined bytes (a link: its target's, as examined). The copy and
    every directory from ``destination``'s up to ``durable_from`` are fsynced before the
    original goes. On BusyError or QuarantineError the file is back at ``path``, untouched,
    and nothing of it is left in quarantine.
    """
    q_dir, q_name = posixpath.split(destination)
    os.makedirs(q_dir, mode=0o700, exist_ok=True)
    q_dirs = [q_dir]
    while q_dirs[-1] != durable_from and q_dirs[-1] != posixpath.dirname(q_dirs[-1]):
        q_dirs.append(posixpath.dirname(q_dirs[-1]))
    directory, name = posixpath.split(path)
    with atomic.open_dir(directory) as src_fd, atomic.open_dir(q_dir) as dst_fd:
        # Renamed aside first (atomic, same directory): from here on nobody opens it by its
        # name, so a version saved at ``name`` meanwhile is a new file, never touched.
        aside = f".{name}.{secrets.token_hex(6)}.quarantine"
        os.rename(name, aside, src_dir_fd=src_fd, dst_dir_fd=src_fd)
        try:
            return _move_verified(
                _Move(path, src_fd, aside, dst_fd, q_name, tuple(q_dirs)), examined
            )
        except BaseException as exc:
            if not _put_back(src_fd, aside, name) and isinstance(exc, Exception):
                raise QuarantineError(
                    f"{path} was written while healing; the examined file stays beside it as "
                    f"{aside}"
                ) from exc
            raise


def _open_for_writing(fd: int, path: str) -> bool:
    try:
        return writers.open_for_writing(fd)
    except OSError as exc:
        # Not the owner, or no leases on this file system: the worst must be assumed.
        raise QuarantineError(
            f"cannot tell whether {path} is being written ({exc.strerror or exc}); left alone"
        ) from exc


@dataclass(frozen=True, slots=True)
class _Move:
    """One move: the file renamed ``aside`` in ``src_fd`` goes to ``q_name`` in ``dst_fd``."""

    path: str
    src_fd: int
    aside: str
    dst_fd: int
    q_name: str
    q_dirs: tuple[str, ...]


def _move_verified(move: _Move, examined: FileFact) -> str | None:
    """Move the file into quarantine only if it is still exactly what was examined.

    On an exception the file is still ``aside`` and the quarantine holds nothing of it.
    """
    if examined.kind is not FileKind.FILE:
        _verify_entry(move, examined)
        return _move_entry(move, examined)
    fd = os.open(move.aside, _READ_FLAGS, dir_fd=move.src_fd)
    try:
        sha256 = _verify_file(fd, move.path, examined)
        try:
            os.rename(move.aside, move.q_name, src_dir_fd=move.src_fd, dst_dir_fd=move.dst_fd)
        except OSError as exc:
            if exc.errno != errno.EXDEV:  # the state dir is on another file system
                raise
        else:
            _sync_or_return(move)
            return sha256
        copied = _copy(fd, move)
        try:
            atomic.sync_dirs(move.q_dirs)
            if copied != examined.sha256:
                raise BusyError(f"{move.path} changed while it was copied")
            # Only now, with the copy durable, is the original looked at a last time.
            _verify_file(fd, move.path, examined)
            os.unlink(move.aside, dir_fd=move.src_fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(move.q_name, dir_fd=move.dst_fd)
            raise
        return copied
    finally:
        os.close(fd)


def _verify_file(fd: int, path: str, examined: FileFact) -> str:
    """The file's hash, once nobody has it open for writing and it is as examined."""
    if _open_for_writing(fd, path):
        raise BusyError(f"{path} was opened for writing while healing")
    st = os.fstat(fd)
    sha256 = _hash(fd)
    if (st.st_ino, st.st_size, st.st_mtime_ns, sha256) != (
        examined.inode,
        examined.size,
        examined.mtime_ns,
        examined.sha256,
    ):
        raise BusyError(f"{path} changed while healing")
    return sha256


def _verify_entry(move: _Move, examined: FileFact) -> None:
    """A link (or anything but a regular file) is as examined: same inode, same target."""
    st = os.lstat(move.aside, dir_fd=move.src_fd)
    target = os.readlink(move.aside, dir_fd=move.src_fd) if stat.S_ISLNK(st.st_mode) else None
    if (st.st_ino, target) != (examined.inode, examined.target):
        raise BusyError(f"{move.path} changed while healing")


def _move_entry(move: _Move, examined: FileFact) -> str | None:
    """Rename a link (or directory) into quarantine; across file systems, recreate a link."""
    try:
        os.rename(move.aside, move.q_name, src_dir_fd=move.src_fd, dst_dir_fd=move.dst_fd)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    else:
        _sync_or_return(move)
        return examined.sha256
    if examined.kind is not FileKind.SYMLINK or examined.target is None:
        raise QuarantineError(f"a {examined.kind.value} cannot be copied to another file system")
    os.symlink(examined.target, move.q_name, dir_fd=move.dst_fd)
    try:
        atomic.sync_dirs(move.q_dirs)
        os.unlink(move.aside, dir_fd=move.src_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(move.q_name, dir_fd=move.dst_fd)
        raise
    return examined.sha256


def _sync_or_return(move: _Move) -> None:
    """Make the rename into quarantine durable; if that fails, rename the file aside again."""
    try:
        atomic.sync_dirs(move.q_dirs)
    except BaseException:
        os.rename(move.q_name, move.aside, src_dir_fd=move.dst_fd, dst_dir_fd=move.src_fd)
        raise


def _copy(fd: int, move: _Move) -> str:
    """Copy the open file into quarantine and fsync it; the hash of exactly the bytes written."""
    digest = hashlib.sha256()
    dst = os.open(move.q_name, _NEW_FILE_FLAGS, 0o600, dir_fd=move.dst_fd)
    try:
        offset = 0
        while chunk := os.pread(fd, _CHUNK, offset):
            offset += len(chunk)
            digest.update(chunk)
            while chunk:  # os.write may write less than asked
                chunk = chunk[os.write(dst, chunk) :]
        os.fsync(dst)
    except BaseException:
        # A partial copy (ENOSPC, EIO) must not sit in quarantine posing as the file.
        with contextlib.suppress(OSError):
            os.unlink(move.q_name, dir_fd=move.dst_fd)
        raise
    finally:
        os.close(dst)
    return digest.hexdigest()


def _hash(fd: int) -> str:
    digest = hashlib.sha256()
    offset = 0
    while chunk := os.pread(fd, _CHUNK, offset):
        offset += len(chunk)
        digest.update(chunk)
    return digest.hexdigest()


def _put_back(src_fd: int, aside: str, name: str) -> bool:
    """Give the file renamed aside its name back, unless something took the name meanwhile."""
    try:
        if stat.S_ISDIR(os.lstat(aside, dir_fd=src_fd).st_mode):
            # A directory cannot be hard-linked; rename(2) never puts it over a file or a
            # non-empty directory.
            os.rename(aside, name, src_dir_fd=src_fd, dst_dir_fd=src_fd)
            return True
        os.link(aside, name, src_dir_fd=src_fd, dst_dir_fd=src_fd, follow_symlinks=False)
    except OSError:
        return False
    with contextlib.suppress(OSError):
        os.unlink(aside, dir_fd=src_fd)
    return True

"""Atomic writes that never follow a symlink: temp name in the same directory, then rename."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Iterable, Iterator

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


@contextlib.contextmanager
def open_dir(path: str) -> Iterator[int]:
    """A directory fd opened without following a final symlink, closed on exit."""
    fd = os.open(path, _DIR_FLAGS)
    try:
        yield fd
    finally:
        os.close(fd)


def _replace(directory: str, name: str, create: Callable[[str, int], None]) -> None:
    """Create a temp entry with ``create(temp, dir_fd)``, then rename it over ``name``."""
    with open_dir(directory) as dfd:
        temp = f".{name}.{secrets.token_hex(6)}.tmp"
        try:
            create(temp, dfd)
            os.rename(temp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp, dir_fd=dfd)
            raise
        os.fsync(dfd)


def write_file(directory: str, name: str, data: bytes, mode: int = 0o600) -> None:
    """Replace ``directory/name`` with ``data`` atomically; a reader sees old or new, never half."""

    def create(temp: str, dfd: int) -> None:
        fd = os.open(temp, _NEW_FILE_FLAGS, mode, dir_fd=dfd)
        with os.fdopen(fd, "wb", closefd=True) as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())

    _replace(directory, name, create)


def create_symlink(directory: str, name: str, target: str) -> None:
    """Create ``directory/name`` as a symlink to ``target``; FileExistsError if anything is there.

    symlink(2) is atomic and never replaces: what appeared at ``name`` meanwhile is left alone.
    """
    with open_dir(directory) as dfd:
        os.symlink(target, name, dir_fd=dfd)
        os.fsync(dfd)


def sync_dirs(directories: Iterable[str]) -> None:
    """fsync each directory, so the entries in them (new subdirectories too) survive a crash."""
    for directory in directories:
        with open_dir(directory) as dfd:
            os.fsync(dfd)

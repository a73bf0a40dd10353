"""Atomic writes that never follow a symlink: temp name in the same directory, then rename."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@contextlib.contextmanager
def open_dir(path: str) -> Iterator[int]:
    """A directory fd opened without following a final symlink, closed on exit."""
    fd = os.open(path, _DIR_FLAGS)
    try:
        yield fd
    finally:
        os.close(fd)


def _temp_name(name: str) -> str:
    return f".{name}.{secrets.token_hex(6)}.tmp"


def write_file(directory: str, name: str, data: bytes, mode: int = 0o600) -> None:
    """Replace ``directory/name`` with ``data`` atomically; a reader sees old or new, never half."""
    with open_dir(directory) as dfd:
        temp = _temp_name(name)
        fd = os.open(
            temp,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            mode,
            dir_fd=dfd,
        )
        try:
            with os.fdopen(fd, "wb", closefd=True) as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.rename(temp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp, dir_fd=dfd)
            raise
        os.fsync(dfd)


def place_symlink(directory: str, name: str, target: str) -> None:
    """Create or replace ``directory/name`` as a symlink to ``target`` atomically."""
    with open_dir(directory) as dfd:
        temp = _temp_name(name)
        os.symlink(target, temp, dir_fd=dfd)
        try:
            os.rename(temp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp, dir_fd=dfd)
            raise
        os.fsync(dfd)

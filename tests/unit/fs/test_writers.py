"""Open-writer detection with a read lease, on real files."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from provenanced.fs.writers import open_for_writing


class TestOpenForWriting:
    def _ask(self, path: Path) -> bool:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            return open_for_writing(fd)
        finally:
            os.close(fd)

    def test_a_writer_holding_the_file_is_seen_until_it_closes(self, tmp_path: Path) -> None:
        """An open write descriptor (this process's counts too) answers True; closed, False."""
        path = tmp_path / "web.service"
        path.write_text("[Service]\n")
        assert not self._ask(path)
        writer = os.open(path, os.O_WRONLY | os.O_APPEND)
        try:
            assert self._ask(path)
        finally:
            os.close(writer)
        assert not self._ask(path)

    def test_readers_are_not_writers(self, tmp_path: Path) -> None:
        """Someone only reading the file (the manager loading it) does not hold a heal back."""
        path = tmp_path / "web.service"
        path.write_text("[Service]\n")
        reader = os.open(path, os.O_RDONLY)
        try:
            assert not self._ask(path)
        finally:
            os.close(reader)

    def test_the_lease_is_released(self, tmp_path: Path) -> None:
        """The probe holds no lease afterwards: a writer opening later is not held up by it."""
        path = tmp_path / "web.service"
        path.write_text("[Service]\n")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            open_for_writing(fd)
            assert fcntl.fcntl(fd, fcntl.F_GETLEASE) == fcntl.F_UNLCK
            writer = os.open(path, os.O_WRONLY | os.O_NONBLOCK)  # EWOULDBLOCK if a lease stayed
            os.close(writer)
        finally:
            os.close(fd)

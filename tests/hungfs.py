"""A real FUSE file system that hangs: every lookup, stat, listing and read waits until released.

What a dead sshfs or NFS mount does to whoever touches it. The server runs in a child process
(libfuse 3 through mfusepy) and is steered over its stdin: ``hang`` / ``release``. It reports
each call it holds on stdout, so a test knows the daemon really touched the mount. Released, it
is an empty directory: every name in it is missing.

``HungFs`` always releases and unmounts on the way out (``umount --lazy`` as the last resort),
so a failing test never leaves a hung mount on the machine.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path
from types import TracebackType
from typing import Any

from helpers import wait_until

_MOUNTED = "mounted"
_HELD = "held"  # "held <operation> <path>"


class HungFs:
    """The hanging file system mounted on ``mountpoint`` (an empty directory), hung from the start."""

    def __init__(self, mountpoint: Path, timeout: float = 30.0) -> None:
        self.mountpoint = mountpoint
        self.timeout = timeout
        self._held: list[tuple[str, str]] = []
        self._lines = threading.Condition()
        self._proc: subprocess.Popen[str] | None = None
        self._mounted = False

    def __enter__(self) -> HungFs:
        self.mountpoint.mkdir(mode=0o755, exist_ok=True)
        self._proc = subprocess.Popen(
            [sys.executable, __file__, str(self.mountpoint)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        threading.Thread(target=self._read_reports, name="hungfs.reports", daemon=True).start()
        try:
            wait_until(
                lambda: self._mounted or self._proc is None or self._proc.poll() is not None,
                self.timeout,
                message="the FUSE server to mount",
            )
            if not self._mounted:
                raise AssertionError(f"the FUSE server exited {self._proc.returncode} unmounted")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def hang(self) -> None:
        """From now on every call waits (calls already answered stay answered)."""
        self._send("hang")

    def release(self) -> None:
        """Answer every held call, and the ones to come: the directory is empty."""
        self._send("release")

    def held(self) -> list[tuple[str, str]]:
        """Every call held so far, as (operation, path) in the order they came."""
        with self._lines:
            return list(self._held)

    def wait_held(self) -> list[tuple[str, str]]:
        """Wait until some call is being held (the first is often the mount's root, ``/``)."""
        return wait_until(self.held, self.timeout, message="a call held by the hung mount")

    def close(self) -> None:
        """Release, let the server unmount and end, and make sure; safe to call twice."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            if proc.stdin is not None:
                # Released, then EOF: the server answers everything, unmounts and ends.
                proc.stdin.write("release\n")
                proc.stdin.close()
        except OSError:
            pass  # the server died: the kernel answers every call with ENOTCONN now
        try:
            proc.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            proc.kill()  # a dead server aborts the connection: every held call fails
            proc.wait(timeout=self.timeout)
        _unmount(self.mountpoint)

    def _send(self, command: str) -> None:
        assert self._proc is not None and self._proc.stdin is not None, "not mounted"
        self._proc.stdin.write(command + "\n")
        self._proc.stdin.flush()

    def _read_reports(self) -> None:
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        for line in proc.stdout:
            word, _, rest = line.rstrip("\n").partition(" ")
            with self._lines:
                if word == _MOUNTED:
                    self._mounted = True
                elif word == _HELD:
                    operation, _, path = rest.partition(" ")
                    self._held.append((operation, path))
                self._lines.notify_all()


def _is_mounted(mountpoint: Path) -> bool:
    """Read from the mount table: a stat of a hung mountpoint would itself hang."""
    target = os.fsencode(os.path.abspath(mountpoint))
    with open("/proc/self/mountinfo", "rb") as table:
        return any(line.split()[4] == target for line in table)


def _unmount(mountpoint: Path) -> None:
    """Unmount what the server left mounted: ``fusermount3 -u``, else lazily."""
    if not _is_mounted(mountpoint):
        return
    fusermount = shutil.which("fusermount3") or "fusermount3"
    done = subprocess.run([fusermount, "-u", str(mountpoint)], check=False, capture_output=True)
    if done.returncode != 0 or _is_mounted(mountpoint):
        subprocess.run(["umount", "--lazy", str(mountpoint)], check=True)


# --- the server, in the child process -------------------------------------------------------


def _serve(mountpoint: str) -> None:
    import mfusepy  # only the server needs libfuse

    class Hung(mfusepy.Operations):  # type: ignore[misc]
        use_ns = True

        def __init__(self) -> None:
            self.hung = True
            self.ending = False
            self.changed = threading.Condition()

        def gate(self, operation: str, path: str) -> None:
            with self.changed:
                if self.hung:
                    print(_HELD, operation, path, flush=True)
                self.changed.wait_for(lambda: not self.hung)

        def steer(self) -> None:
            for line in sys.stdin:
                with self.changed:
                    self.hung = line.strip() == "hang"
                    self.changed.notify_all()
            with self.changed:  # the test is gone: release everything and end
                self.hung, self.ending = False, True
                self.changed.notify_all()
            os.kill(os.getpid(), signal.SIGTERM)  # libfuse leaves its loop and unmounts

        def init(self, path: str) -> None:
            threading.Thread(target=self.steer, name="steer", daemon=True).start()
            print(_MOUNTED, flush=True)

        def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
            self.gate("getattr", path)
            if path != "/":
                raise mfusepy.FuseOSError(errno.ENOENT)
            return {"st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2}

        def readdir(self, path: str, fh: int) -> list[str]:
            self.gate("readdir", path)
            return [".", ".."]

        def readlink(self, path: str) -> str:
            self.gate("readlink", path)
            raise mfusepy.FuseOSError(errno.ENOENT)

        def open(self, path: str, flags: int) -> int:
            self.gate("open", path)
            raise mfusepy.FuseOSError(errno.ENOENT)

        def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
            self.gate("read", path)
            raise mfusepy.FuseOSError(errno.ENOENT)

    hung = Hung()
    try:
        # No caching in the kernel: each access reaches the server, as on a mount that just died.
        mfusepy.FUSE(
            hung,
            mountpoint,
            foreground=True,
            allow_other=True,
            attr_timeout=0,
            entry_timeout=0,
            negative_timeout=0,
            fsname="hungfs",
        )
    except RuntimeError:
        if not hung.ending:  # libfuse reports the SIGTERM we sent ourselves as an error
            raise


if __name__ == "__main__":
    _serve(sys.argv[1])

"""Process, socket and cgroup helpers shared by the sandbox parts."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Self

from provenanced.errors import ProvenancedError


class StartStop:
    """Started on entering a ``with`` block and stopped on leaving it, also when starting fails."""

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _first_executable(*candidates: str) -> Path:
    """Pick the binary where this distribution put it; the first candidate names it if none."""
    return Path(next((c for c in candidates if os.access(c, os.X_OK)), candidates[0]))


SYSTEMD_BINARY = _first_executable("/lib/systemd/systemd", "/usr/lib/systemd/systemd")
JOURNALD_BINARY = _first_executable(
    "/lib/systemd/systemd-journald", "/usr/lib/systemd/systemd-journald"
)
JOURNAL_SOCKET = Path("/run/systemd/journal/socket")
# `systemd --user` refuses to start unless this exists ("system has not been booted with systemd").
BOOTED_MARKER = Path("/run/systemd/system")
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Set in the manager's environment, which it hands to every service: lets stop() find strays.
SANDBOX_MARKER = "PROVENANCED_SANDBOX"
NIX_BASE32 = "0123456789abcdfghijklmnpqrsvwxyz"
HM_FILES_SUFFIX = "-home-manager-files"
HM_GENERATION_SUFFIX = "-home-manager-generation"

_SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes including the NUL
_LOG_TAIL_LINES = 30
_CALL_TIMEOUT = 15.0
_POLL_INTERVAL = 0.05
_NIX_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9+\-._?=]")
_WANTS_DIR = re.compile(r"\.(wants|requires|upholds)$")
# Runs in the child between fork and exec: join the sandbox cgroups, then become the manager.
# (A fresh interpreter rather than preexec_fn, which is unsafe once the caller has threads.)
_JOIN_CGROUPS_AND_EXEC = """\
import os, sys
sep = sys.argv.index("--")
for procs in sys.argv[1:sep]:
    with open(procs, "w") as f:
        f.write(str(os.getpid()))
os.execv(sys.argv[sep + 1], sys.argv[sep + 1:])
"""


class SandboxError(ProvenancedError):
    """The sandboxed manager or journald could not be set up, reached or torn down."""

    exit_code = 3


# --- small process helpers -------------------------------------------------------------------


def _tool(name: str, package: str) -> str:
    """The system tool ``name`` on the system PATH, or one error naming the package to install."""
    path = shutil.which(name, path=SYSTEM_PATH)
    if path is None:
        raise SandboxError(f"{name} is missing; install {package}")
    return path


def _poll(predicate: Callable[[], bool], timeout: float) -> bool:
    """Poll a condition outside our control until it holds; False once the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_INTERVAL)


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    """Return the end of a log so a failure message shows why a daemon gave up."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


def _pid_alive(pid: int) -> bool:
    """Say whether a pid runs; zombies count as gone because they hold nothing."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return False
    return fields[0] not in ("Z", "X")


def _marked_pids(marker: bytes) -> list[int]:
    """Find processes carrying our marker in their environment: services the manager forked."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            environ = Path(entry.path, "environ").read_bytes()
        except OSError:
            continue
        if marker in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def _cgroup_hierarchies() -> list[Path]:
    """Mount points of the hierarchies a user manager files units in: cgroup2 and name=systemd."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mount, _, fs = line.partition(" - ")
        fstype, _source, options = fs.split()[:3]
        if fstype == "cgroup2" or (fstype == "cgroup" and "name=systemd" in options.split(",")):
            found.append(Path(mount.split()[4]))
    return found


def _cgroup_pids(cgroups: list[Path]) -> set[int]:
    """Every pid anywhere below the sandbox's cgroups."""
    pids: set[int] = set()
    for top in cgroups:
        for dirpath, _dirs, _files in os.walk(top):
            with contextlib.suppress(OSError):
                pids.update(int(p) for p in Path(dirpath, "cgroup.procs").read_text().split())
    return pids


def _remove_cgroups(cgroups: list[Path]) -> bool:
    """rmdir the sandbox's cgroup trees bottom-up; False while one is still populated."""
    for top in cgroups:
        for dirpath, _dirs, _files in os.walk(top, topdown=False):
            try:
                os.rmdir(dirpath)
            except FileNotFoundError:
                continue
            except OSError:
                return False
    return True


def _end_group(proc: subprocess.Popen[bytes], sig: signal.Signals, grace: float) -> None:
    """Signal a child's process group, then SIGKILL it, reaping last so the pgid stays ours."""
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    _poll(lambda: not _pid_alive(proc.pid), grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=_CALL_TIMEOUT)


def _socket_connectable(path: Path) -> bool:
    """Tell a live datagram socket from a stale file left behind by a dead daemon."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


def _remove_tree(path: Path) -> None:
    """Delete a tree even where the fake store made directories read-only, as Nix does."""
    if path.exists():
        for dirpath, _dirs, _files in os.walk(path):
            os.chmod(dirpath, 0o755)
        shutil.rmtree(path)

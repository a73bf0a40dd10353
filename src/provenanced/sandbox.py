"""A real, throw-away `systemd --user` manager plus a fake Home Manager store, for tests and demo.

Synchronous on purpose: pytest fixtures and `provenanced demo` both drive it without a loop.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import TracebackType

from provenanced.errors import ProvenancedError

__all__ = [
    "Generation",
    "Journald",
    "Sandbox",
    "SandboxError",
    "activate",
    "boot",
    "build_generation",
    "ensure_journald",
    "example_units",
    "journald_listening",
]


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


# --- journald --------------------------------------------------------------------------------


class Journald:
    """A standalone systemd-journald we started; only its starter stops it."""

    def __init__(self, proc: subprocess.Popen[bytes], log: Path) -> None:
        self._proc = proc
        self._log = log

    @property
    def pid(self) -> int:
        """The journald pid, so tests can prove it is gone after stop()."""
        return self._proc.pid

    def stop(self) -> None:
        """Terminate journald and drop its log; safe to call twice."""
        _end_group(self._proc, signal.SIGTERM, grace=5.0)
        self._log.unlink(missing_ok=True)


def journald_listening() -> bool:
    """Whether some journald accepts entries now, whoever started it."""
    return _socket_connectable(JOURNAL_SOCKET)


def ensure_journald(timeout: float = 10.0) -> Journald | None:
    """Make sure journald listens: None when one already does, else a handle to the one we start."""
    if journald_listening():
        return None
    if os.geteuid() != 0:
        raise SandboxError(f"no journald listens on {JOURNAL_SOCKET} and only root can start one")
    if not os.access(JOURNALD_BINARY, os.X_OK):
        raise SandboxError(
            f"no journald listens on {JOURNAL_SOCKET} and {JOURNALD_BINARY} is missing"
        )
    fd, log_name = tempfile.mkstemp(prefix="provenanced-journald-", suffix=".log")
    log = Path(log_name)
    with os.fdopen(fd, "wb") as out:
        proc = subprocess.Popen(
            [str(JOURNALD_BINARY)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={"PATH": SYSTEM_PATH, "LANG": "C.UTF-8"},
            start_new_session=True,
        )
    handle = Journald(proc, log)
    answered = _poll(
        lambda: proc.poll() is not None or _socket_connectable(JOURNAL_SOCKET), timeout
    )
    if answered and proc.returncode is None:
        return handle
    tail = _tail(log)
    handle.stop()
    raise SandboxError(f"journald did not open {JOURNAL_SOCKET} within {timeout}s:\n{tail}")


# --- Home Manager layout ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Generation:
    """One Home Manager generation in the fake store: what `current-home` points at."""

    path: Path
    home_files: Path
    files: tuple[str, ...]

    def source(self, rel: str) -> Path:
        """The store file a home-relative path finally resolves to in this generation."""
        return Path(os.path.realpath(self.home_files / rel))


def _nix_base32(digest: bytes) -> str:
    """Encode like Nix's printHash32 (least significant bits last) so names look genuine."""
    length = (len(digest) * 8 + 4) // 5
    chars = []
    for n in range(length - 1, -1, -1):
        bit = n * 5
        i, j = divmod(bit, 8)
        c = digest[i] >> j
        if i + 1 < len(digest):
            c |= digest[i + 1] << (8 - j)
        chars.append(NIX_BASE32[c & 0x1F])
    return "".join(chars)


def _store_hash(*parts: str) -> str:
    """A 32-character store hash, deterministic so identical inputs reuse one store path."""
    digest = hashlib.sha256("\0".join(("provenanced-sandbox", *parts)).encode()).digest()
    return _nix_base32(digest[:20])


def _check_rel(rel: str) -> PurePosixPath:
    """Reject paths that would escape HOME or the store tree."""
    path = PurePosixPath(rel)
    if not rel or path.is_absolute() or ".." in path.parts or path.name in ("", "."):
        raise ValueError(f"not a home-relative file path: {rel!r}")
    return path


def _write_store_file(store: Path, rel: str, content: str) -> Path:
    """Add one read-only file to the store unless an identical one is already there."""
    name = _NIX_NAME_UNSAFE.sub("-", PurePosixPath(rel).name)
    target = store / f"{_store_hash('file', rel, content)}-{name}"
    if not target.exists():
        tmp = store / f".tmp-{secrets.token_hex(8)}"
        tmp.write_text(content)
        tmp.chmod(0o444)
        os.replace(tmp, target)
    return target


def _sources(store: Path, files: Mapping[str, str]) -> dict[str, Path]:
    """Map each relative path to its store file; `.wants/` entries reuse the named unit's file."""
    sources = {rel: _write_store_file(store, rel, text) for rel, text in files.items()}
    for rel in files:
        path = PurePosixPath(rel)
        if _WANTS_DIR.search(path.parent.name):
            unit_rel = str(path.parent.parent / path.name)
            if unit_rel in sources:
                sources[rel] = sources[unit_rel]
    return sources


def _publish_dir(store: Path, name: str, fill: Callable[[Path], None]) -> Path:
    """Build a store directory under a temp name and rename it in, like a Nix build output."""
    final = store / name
    if final.exists():
        return final
    tmp = store / f".tmp-{secrets.token_hex(8)}"
    tmp.mkdir()
    fill(tmp)
    for dirpath, _dirs, _files in os.walk(tmp):
        os.chmod(dirpath, 0o555)
    os.replace(tmp, final)
    return final


def build_generation(store: Path, files: Mapping[str, str], name_hint: str = "") -> Generation:
    """Lay out files the way Home Manager's home-files and generation derivations do.

    Args:
        files: home-relative path → content (`.config/systemd/user/web.service`).
        name_hint: mixed into the hashes so equal file sets can still give distinct generations.
    """
    rels = sorted(str(_check_rel(rel)) for rel in files)
    store.mkdir(parents=True, exist_ok=True)
    sources = _sources(store, {str(PurePosixPath(rel)): text for rel, text in files.items()})
    listing = "\n".join(f"{rel}\t{sources[rel].name}" for rel in rels)

    def fill_files(tmp: Path) -> None:
        for rel in rels:
            link = tmp / rel
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(sources[rel])

    home_files = _publish_dir(
        store, f"{_store_hash('home-files', name_hint, listing)}{HM_FILES_SUFFIX}", fill_files
    )

    def fill_generation(tmp: Path) -> None:
        (tmp / "home-files").symlink_to(home_files)
        script = tmp / "activate"
        script.write_text(
            "#!/bin/sh\n"
            "# provenanced sandbox: provenanced.sandbox.activate() links this generation.\n"
            "exit 0\n"
        )
        script.chmod(0o555)

    generation = _publish_dir(
        store,
        f"{_store_hash('generation', name_hint, home_files.name)}{HM_GENERATION_SUFFIX}",
        fill_generation,
    )
    return Generation(path=generation, home_files=home_files, files=tuple(rels))


def _link_atomically(link: Path, target: Path | str) -> None:
    """Point link at target with a temp name and rename, so readers never see it missing."""
    tmp = link.with_name(f".{link.name}.tmp-{secrets.token_hex(6)}")
    tmp.symlink_to(target)
    os.replace(tmp, link)


def _points_into_hm_files(link: Path) -> bool:
    """Only links Home Manager made may be removed; anything else belongs to the user."""
    if not link.is_symlink():
        return False
    return any(part.endswith(HM_FILES_SUFFIX) for part in Path(os.readlink(link)).parts)


def _remove_empty_parents(path: Path, stop_at: Path) -> None:
    """Drop directories emptied by a removed link, as `rmdir -p --ignore-fail-on-non-empty`."""
    for parent in path.parents:
        if parent == stop_at or stop_at not in parent.parents:
            return
        try:
            parent.rmdir()
        except OSError:
            return


def _previous_home_files(gcroot: Path) -> Path | None:
    """The home-files tree of the generation being replaced, if any."""
    if not gcroot.is_symlink():
        return None
    home_files = Path(os.readlink(gcroot)) / "home-files"
    return Path(os.path.realpath(home_files)) if home_files.exists() else None


def _bump_profile(home: Path, generation: Path) -> None:
    """Add a `home-manager-N-link` profile generation the way `nix-env --set` does."""
    profiles = home / ".local/state/nix/profiles"
    profiles.mkdir(parents=True, exist_ok=True)
    profile = profiles / "home-manager"
    if profile.exists() and Path(os.path.realpath(profile)) == Path(os.path.realpath(generation)):
        return
    numbers = [
        int(m.group(1))
        for p in profiles.iterdir()
        if (m := re.fullmatch(r"home-manager-(\d+)-link", p.name))
    ]
    numbered = profiles / f"home-manager-{max(numbers, default=0) + 1}-link"
    numbered.symlink_to(generation)
    _link_atomically(profile, numbered.name)


def activate(home: Path, gen: Generation) -> None:
    """Switch HOME to a generation like Home Manager's checkLinkTargets + linkGeneration."""
    for rel in gen.files:
        target = home / rel
        if os.path.lexists(target) and not target.is_symlink():
            raise SandboxError(f"existing file {target} is in the way of Home Manager's link")
    gcroot = home / ".local/state/home-manager/gcroots/current-home"
    previous = _previous_home_files(gcroot)
    for rel in gen.files:
        target = home / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        _link_atomically(target, gen.home_files / rel)
    if previous is not None and previous != gen.home_files:
        wanted = set(gen.files)
        for dirpath, _dirs, names in os.walk(previous):
            for name in names:
                rel = os.path.relpath(os.path.join(dirpath, name), previous)
                target = home / rel
                if rel not in wanted and _points_into_hm_files(target):
                    target.unlink()
                    _remove_empty_parents(target, home)
    gcroot.parent.mkdir(parents=True, exist_ok=True)
    _link_atomically(gcroot, gen.path)
    _bump_profile(home, gen.path)


_UNITS = ".config/systemd/user"
_PODMAN_WEB = """\
[Unit]
Description=Homelab web front end (podman)
Documentation=https://example.invalid/homelab/web

[Service]
Type=simple
ExecStart=/bin/sleep infinity
Restart=on-failure

[Install]
WantedBy=default.target
"""
_BACKUP_SERVICE = """\
[Unit]
Description=Homelab volume backup

[Service]
Type=oneshot
ExecStart=/bin/true
"""
_BACKUP_TIMER = """\
[Unit]
Description=Run the homelab backup daily

[Timer]
OnCalendar=daily

[Install]
WantedBy=timers.target
"""


def example_units() -> dict[str, str]:
    """A small homelab tree as Home Manager would generate it, loadable by systemd 252."""
    return {
        f"{_UNITS}/podman-web.service": _PODMAN_WEB,
        f"{_UNITS}/podman-web.service.d/10-env.conf": (
            "[Service]\nEnvironment=WEB_PORT=8080 WEB_ROOT=/srv/www\n"
        ),
        f"{_UNITS}/default.target.wants/podman-web.service": _PODMAN_WEB,
        f"{_UNITS}/backup.service": _BACKUP_SERVICE,
        f"{_UNITS}/backup.timer": _BACKUP_TIMER,
        f"{_UNITS}/timers.target.wants/backup.timer": _BACKUP_TIMER,
    }


# --- the sandboxed manager -------------------------------------------------------------------


class Sandbox:
    """A private `systemd --user` in its own HOME and runtime dir; never the caller's manager."""

    def __init__(
        self,
        root: Path | None = None,
        *,
        keep: bool = False,
        timeout: float = 30.0,
        systemd_binary: Path = SYSTEMD_BINARY,
    ) -> None:
        self._owns_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="provenanced-sandbox-")) if root is None else root
        self.root = self.root.absolute()
        self.keep = keep
        self.timeout = timeout
        self.systemd_binary = systemd_binary
        self.home = self.root / "home"
        self.runtime_dir = self.root / "run"
        self.admin_dir = self.root / "etc/systemd/user"
        self.store = self.root / "nix/store"
        self.config_dir = self.home / ".config/systemd/user"
        self.state_dir = self.root / "state"
        self.manager_log = self.root / "manager.log"
        self.generation: Generation | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._stopped = False
        self._marker = f"{SANDBOX_MARKER}={self.root}".encode()
        self._cgroups: list[Path] = []
        # The tree exists from here on; make sure an abandoned sandbox still goes away.
        atexit.register(self.stop)

    # context manager

    def __enter__(self) -> Sandbox:
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

    # addresses and environment

    @property
    def private_socket(self) -> Path:
        """The manager's peer-to-peer socket, what `systemctl --user` and the daemon use first."""
        return self.runtime_dir / "systemd/private"

    @property
    def bus_address(self) -> str:
        """The socket-activated user bus of this sandbox."""
        return f"unix:path={self.runtime_dir / 'bus'}"

    @property
    def env(self) -> dict[str, str]:
        """Environment for children and the daemon, built from scratch so nothing leaks in."""
        return {
            "HOME": str(self.home),
            "XDG_RUNTIME_DIR": str(self.runtime_dir),
            "XDG_CONFIG_HOME": str(self.home / ".config"),
            "XDG_DATA_HOME": str(self.home / ".local/share"),
            "XDG_STATE_HOME": str(self.home / ".local/state"),
            "DBUS_SESSION_BUS_ADDRESS": self.bus_address,
            "PROVENANCED_STATE_DIR": str(self.state_dir),
            "PATH": os.environ.get("PATH", SYSTEM_PATH),
            "LANG": "C.UTF-8",
        }

    def _manager_env(self) -> dict[str, str]:
        """The manager's environment; it passes this on to every service it starts."""
        env = self.env
        del env["PROVENANCED_STATE_DIR"]
        user = os.environ.get("USER", "root") if os.geteuid() != 0 else "root"
        env.update(
            PATH=SYSTEM_PATH,
            USER=user,
            LOGNAME=user,
            # The trailing colon prepends admin_dir to the default path instead of replacing it.
            SYSTEMD_UNIT_PATH=f"{self.admin_dir}:",
            # Console, i.e. manager.log, so a failed boot can show why.
            SYSTEMD_LOG_TARGET="console",
        )
        env[SANDBOX_MARKER] = str(self.root)
        return env

    @property
    def manager_pid(self) -> int:
        """Pid of the running manager, for fault tests and leak checks."""
        if self._proc is None or self._proc.returncode is not None:
            raise SandboxError("the sandboxed manager is not running")
        return self._proc.pid

    @property
    def cgroups(self) -> tuple[Path, ...]:
        """The sandbox's own cgroup in each hierarchy; empty when unprivileged without cgroups."""
        return tuple(self._cgroups)

    @property
    def running(self) -> bool:
        """Whether the manager we started is alive; never reaps it, so its pgid stays ours."""
        return (
            self._proc is not None and self._proc.returncode is None and _pid_alive(self._proc.pid)
        )

    # lifecycle

    def _check_host(self) -> None:
        """Fail with one sentence when this host cannot run a user manager at all."""
        if not os.access(self.systemd_binary, os.X_OK):
            raise SandboxError(f"{self.systemd_binary} is missing; install the systemd package")
        if not BOOTED_MARKER.is_dir():
            if os.geteuid() != 0:
                raise SandboxError(
                    f"systemd --user needs {BOOTED_MARKER}/ to exist; create it once as root"
                )
            BOOTED_MARKER.mkdir(parents=True, exist_ok=True)
        if len(str(self.private_socket)) > _SUN_PATH_MAX:
            raise SandboxError(f"sandbox root {self.root} is too long for a unix socket path")

    def _make_dirs(self) -> None:
        """Create the sandbox tree; the runtime dir must be 0700 like a real one."""
        for path in (self.home, self.admin_dir, self.store, self.config_dir, self.state_dir):
            path.mkdir(parents=True, exist_ok=True)
        self.runtime_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.runtime_dir.chmod(0o700)

    def _make_cgroups(self) -> list[Path]:
        """Give the manager cgroups of its own, the roots it will file its units under.

        A user manager in `/init.scope` strips that suffix and roots its tree at `/`, so every
        sandbox on the host would share `/app.slice/<unit>` and stop each other's services.
        """
        name = f"provenanced-sandbox-{_store_hash('cgroup', str(self.root))[:16]}"
        cgroups = [hierarchy / name for hierarchy in _cgroup_hierarchies()]
        try:
            for cgroup in cgroups:
                cgroup.mkdir(exist_ok=True)
        except PermissionError:
            if os.geteuid() == 0:
                raise
            return []  # an unprivileged caller shares cgroups; concurrent sandboxes may clash
        return cgroups

    def _manager_argv(self) -> list[str]:
        """The manager's command line, behind the cgroup-joining launcher when we have cgroups."""
        argv = [str(self.systemd_binary), "--user"]
        if not self._cgroups:
            return argv
        procs = [str(cgroup / "cgroup.procs") for cgroup in self._cgroups]
        return [sys.executable, "-I", "-S", "-c", _JOIN_CGROUPS_AND_EXEC, *procs, "--", *argv]

    def start(self) -> None:
        """Boot the manager and return once it answers on its private socket."""
        if self.running:
            return
        if self._stopped:
            raise SandboxError("this sandbox was stopped; create a new one")
        self._check_host()
        self._make_dirs()
        try:
            self._cgroups = self._make_cgroups()
        except OSError as exc:
            raise SandboxError(f"cannot create the sandbox cgroups: {exc}") from exc
        with self.manager_log.open("ab") as log:
            self._proc = subprocess.Popen(
                self._manager_argv(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._manager_env(),
                cwd=self.home,
                start_new_session=True,
            )
        self._wait_ready()

    def _is_ready(self) -> bool:
        """Ready means the manager finished starting up and answers `systemctl --user`."""
        if not self.running:
            self._kill_manager()
            status = self._proc.returncode if self._proc is not None else None
            raise SandboxError(
                f"systemd --user exited with status {status}:\n{_tail(self.manager_log)}"
            )
        if not self.private_socket.exists():
            return False
        try:
            state = self.systemctl("is-system-running", check=False, timeout=5.0).stdout.strip()
        except SandboxError:
            return False
        return state in ("running", "degraded")

    def _wait_ready(self) -> None:
        """Bound the boot: a manager that never answers must fail the caller, not hang it."""
        if not _poll(self._is_ready, self.timeout):
            tail = _tail(self.manager_log)
            self._kill_manager()
            raise SandboxError(
                f"systemd --user did not answer on {self.private_socket} within "
                f"{self.timeout}s:\n{tail}"
            )

    def _leftover_pids(self) -> set[int]:
        """Processes of this sandbox: by cgroup, and by environment marker where cgroups lack."""
        pids = _cgroup_pids(self._cgroups) | set(_marked_pids(self._marker))
        pids.discard(os.getpid())
        return pids

    def _kill_manager(self) -> None:
        """SIGKILL the manager's process group and every service it forked."""
        if self._proc is not None:
            _end_group(self._proc, signal.SIGKILL, grace=_CALL_TIMEOUT)
        # Services setsid() out of the manager's process group, so the group kill misses them.
        for pid in self._leftover_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if not _poll(lambda: not self._leftover_pids(), _CALL_TIMEOUT):
            raise SandboxError(f"processes survived SIGKILL: {sorted(self._leftover_pids())}")

    def stop(self) -> None:
        """Exit the manager, kill what remains, and delete the tree we created; idempotent."""
        if self._stopped:
            return
        self._stopped = True
        atexit.unregister(self.stop)
        try:
            if self._proc is not None and self.running:
                pid = self._proc.pid
                # A wedged manager must not keep us from the SIGKILL below.
                with contextlib.suppress(SandboxError):
                    self.systemctl("exit", check=False)
                _poll(lambda: not _pid_alive(pid), 10.0)
            self._kill_manager()
            if not _poll(lambda: _remove_cgroups(self._cgroups), _CALL_TIMEOUT):
                raise SandboxError(f"cannot remove the sandbox cgroups {self._cgroups}")
        finally:
            if self._owns_root and not self.keep:
                _remove_tree(self.root)

    def restart_manager(self) -> None:
        """Crash the manager with SIGKILL and boot a new one over the same directories."""
        if self._proc is None:
            raise SandboxError("the sandboxed manager was never started")
        self._kill_manager()
        self._proc = None
        self.start()

    # talking to the manager

    def systemctl(
        self, *args: str, check: bool = True, timeout: float = _CALL_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        """Run `systemctl --user` against this sandbox only."""
        argv = [shutil.which("systemctl", path=SYSTEM_PATH) or "systemctl", "--user", "--no-pager"]
        argv.extend(args)
        try:
            result = subprocess.run(
                argv,
                env=self.env,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise SandboxError(f"{' '.join(argv)} timed out after {timeout}s") from exc
        if check and result.returncode != 0:
            raise SandboxError(
                f"{' '.join(argv)} failed with status {result.returncode}: "
                f"{result.stderr.strip() or result.stdout.strip()}"
            )
        return result

    def show(self, unit: str | None, *properties: str) -> dict[str, str]:
        """Read manager or unit properties as `systemctl show` prints them."""
        args = ["show", *(f"--property={name}" for name in properties)]
        out = self.systemctl(*args, *([unit] if unit else [])).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def daemon_reload(self) -> None:
        """Make the manager re-read unit files after the tree changed."""
        self.systemctl("daemon-reload")

    def install_home_manager(self, files: Mapping[str, str] | None = None) -> Generation:
        """Build and activate a Home Manager generation, then reload a running manager."""
        gen = build_generation(self.store, example_units() if files is None else files)
        activate(self.home, gen)
        self.generation = gen
        if self.running:
            self.daemon_reload()
        return gen


def boot(root: Path | None = None, keep: bool = False) -> Sandbox:
    """Create and start a sandbox in one call; the caller owns stop()."""
    sandbox = Sandbox(root, keep=keep)
    try:
        sandbox.start()
    except BaseException:
        sandbox.stop()
        raise
    return sandbox

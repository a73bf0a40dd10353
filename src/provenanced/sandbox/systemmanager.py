"""A real systemd as PID 1, with real user managers under it: where host mode's system unit runs.

The system manager boots in its own pid, mount and cgroup namespaces (``unshare``), like a
container's init (``container=`` set, so it skips what only a machine's init does). It sees a
private ``/run`` and a cgroup2 tree rooted at a cgroup of ours, and only the unit files of the
sandbox: a few empty targets in place of a distribution's boot chain, plus copies of the host's
own ``user@.service`` and ``user-runtime-dir@.service`` so each user's manager starts the way
logind starts it on a real host. ``/etc/systemd/system``, ``/home``, ``/var/lib`` and
``/var/log`` are the sandbox's directories bound over the host's inside the namespace only, so
what an install writes there, and the users' homes, never touch the machine's own.

Clients must run inside the namespaces (``run``): a D-Bus server of systemd refuses a peer
whose pid it cannot see (``getpeercred()`` in src/basic/socket-util.c rejects pid 0).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from provenanced.sandbox._proc import (
    _CALL_TIMEOUT,
    SYSTEM_PATH,
    SYSTEMD_BINARY,
    SandboxError,
    StartStop,
    _cgroup_hierarchies,
    _cgroup_pids,
    _pid_alive,
    _poll,
    _remove_cgroups,
    _remove_tree,
    _tail,
    _tool,
)
from provenanced.sandbox.accounts import Account, create_account, remove_account

UNIT_DIR = Path("/etc/systemd/system")
# The host's unit files copied into the sandbox: what user@<uid>.service needs to start.
_HOST_UNITS = (
    "user@.service",
    "user-runtime-dir@.service",
    "user.slice",
    "user-.slice.d",
    "systemd-journald.service",
    "systemd-journald.socket",
    "systemd-journald-dev-log.socket",
    "systemd-journald-audit.socket",
)
_HOST_UNIT_DIRS = (Path("/lib/systemd/system"), Path("/usr/lib/systemd/system"))
# Empty stand-ins for the boot chain: default dependencies resolve, nothing of the host starts.
_TARGETS = (
    "sandbox.target",
    "sysinit.target",
    "basic.target",
    "sockets.target",
    "timers.target",
    "paths.target",
    "slices.target",
    "local-fs.target",
    "network.target",
    "network-online.target",
    "multi-user.target",
    "shutdown.target",
)
# Without logind and PAM nothing sets the user's runtime dir; pam_systemd would.
_USER_DROPIN = """\
[Service]
PAMName=
Environment=XDG_RUNTIME_DIR=/run/user/%i
"""
# systemd-user-runtime-dir asks logind (over the system bus) for the size; without it, mount
# the same private tmpfs it would (src/login/user-runtime-dir.c, user_mkdir_runtime_path()).
_RUNTIME_DIR_DROPIN = """\
[Service]
ExecStart=
ExecStart=/bin/sh -c 'mkdir -p /run/user/%i && \
mount -t tmpfs -o "mode=0700,uid=%i,gid=$$(id -g %i),nosuid,nodev" tmpfs /run/user/%i'
ExecStop=
ExecStop=/bin/umount --lazy /run/user/%i
"""
# Runs as PID 1 of the new namespaces: private /run, cgroup2 rooted at ours, binds, then init.
_BOOT = """\
import os, subprocess, sys
def mount(*args):
    subprocess.run(["mount", *args], check=True)
mount("-t", "tmpfs", "-o", "mode=0755,nosuid,nodev", "tmpfs", "/run")
mount("-t", "cgroup2", "-o", "nsdelegate", "cgroup2", "/sys/fs/cgroup")
sep = sys.argv.index("--")
pairs = sys.argv[1:sep]
for source, target in zip(pairs[::2], pairs[1::2]):
    mount("--bind", source, target)
os.execve(sys.argv[sep + 1], sys.argv[sep + 1:], {
    "container": "provenanced-sandbox",
    "SYSTEMD_UNIT_PATH": os.environ["SYSTEMD_UNIT_PATH"],
    "PATH": os.environ["PATH"],
})
"""


def _host_unit(name: str) -> Path:
    for directory in _HOST_UNIT_DIRS:
        if (directory / name).exists():
            return directory / name
    raise SandboxError(f"{name} is missing from {_HOST_UNIT_DIRS[0]}; install systemd")


class SystemSandbox(StartStop):
    """A throw-away system manager (PID 1 of its namespaces) and real users' managers under it."""

    def __init__(self, *, keep: bool = False, timeout: float = 30.0) -> None:
        if os.geteuid() != 0:
            raise SandboxError("a system sandbox boots an init and needs root")
        self.root = Path(tempfile.mkdtemp(prefix="provenanced-system-"))
        self.root.chmod(0o755)
        self.keep = keep
        self.timeout = timeout
        self.units = self.root / "units"
        # Inside the namespace each of these is bound over the host directory of the same name.
        self.binds = {
            UNIT_DIR: self.root / "etc-systemd-system",
            Path("/home"): self.root / "home",
            Path("/var/lib"): self.root / "var-lib",
            Path("/var/log"): self.root / "var-log",
        }
        self.log = self.root / "init.log"
        self.users: list[Account] = []
        self.pid = 0  # systemd's pid as the host sees it
        self._proc: subprocess.Popen[bytes] | None = None
        # The cgroup2 hierarchy: /sys/fs/cgroup/unified on a hybrid host, /sys/fs/cgroup on v2.
        unified = [h for h in _cgroup_hierarchies() if h.name != "systemd"]
        self._cgroup = (unified or [Path("/sys/fs/cgroup")])[
            0
        ] / f"provenanced-system-{secrets.token_hex(6)}"
        self._stopped = False
        atexit.register(self.stop)

    def path(self, inside: Path | str) -> Path:
        """Where a path of the namespace (under one of the bound directories) is on the host."""
        inside = Path(inside)
        for target, source in self.binds.items():
            if inside == target or target in inside.parents:
                return source / inside.relative_to(target)
        raise SandboxError(f"{inside} is not inside a directory the sandbox owns")

    def _write_units(self) -> None:
        self.units.mkdir()
        for name in _TARGETS:
            (self.units / name).write_text(f"[Unit]\nDescription=sandbox stand-in for {name}\n")
        # The journal is part of what the system service is tried with.
        (self.units / "sandbox.target").write_text(
            "[Unit]\nDescription=the system sandbox\nWants=systemd-journald.service\n"
        )
        for name in _HOST_UNITS:
            source = _host_unit(name)
            copy = shutil.copytree if source.is_dir() else shutil.copyfile
            copy(source, self.units / name)
        for unit, dropin in (
            ("user@.service", _USER_DROPIN),
            ("user-runtime-dir@.service", _RUNTIME_DIR_DROPIN),
        ):
            (self.units / f"{unit}.d").mkdir()
            (self.units / f"{unit}.d/sandbox.conf").write_text(dropin)
        for source in self.binds.values():
            source.mkdir(mode=0o755)

    def start(self) -> None:
        """Boot the system manager and wait until it has reached its start target."""
        if self._stopped:
            raise SandboxError("this system sandbox was stopped; create a new one")
        if not (self._cgroup.parent / "cgroup.subtree_control").exists():
            raise SandboxError(f"{self._cgroup.parent} is not a cgroup2 hierarchy")
        for target in self.binds:
            if target in Path(sys.prefix).resolve().parents:
                raise SandboxError(f"{sys.prefix} is under {target}, which the sandbox replaces")
        self._write_units()
        self._cgroup.mkdir()
        binds = [str(p) for target, source in self.binds.items() for p in (source, target)]
        join = f"open('{self._cgroup}/cgroup.procs', 'w').write(str(__import__('os').getpid()))"
        init = [str(SYSTEMD_BINARY), "--system", "--unit=sandbox.target", "--log-target=console"]
        argv = [
            sys.executable,
            "-c",
            f"{join}; import os, sys; os.execv(sys.argv[1], sys.argv[1:])",
            _tool("unshare", "util-linux"),
            "--pid",
            "--fork",
            "--mount",
            "--propagation=private",
            "--cgroup",
            "--mount-proc",
            sys.executable,
            "-c",
            _BOOT,
            *binds,
            "--",
            *init,
        ]
        env = {"SYSTEMD_UNIT_PATH": f"{UNIT_DIR}:{self.units}", "PATH": SYSTEM_PATH}
        with self.log.open("ab") as log:
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env
            )
        if not _poll(self._booted, self.timeout):
            raise SandboxError(f"the system manager did not boot:\n{_tail(self.log)}")

    def _booted(self) -> bool:
        assert self._proc is not None
        if self._proc.poll() is not None:
            raise SandboxError(
                f"unshare exited with {self._proc.returncode} before the system manager ran:\n"
                f"{_tail(self.log)}"
            )
        if not self.pid:
            with contextlib.suppress(OSError, ValueError, IndexError):
                children = Path(f"/proc/{self._proc.pid}/task/{self._proc.pid}/children")
                self.pid = int(children.read_text().split()[0])
            return False
        state = self.systemctl("is-system-running", check=False).stdout.strip()
        return state in ("running", "degraded")

    def run(
        self, argv: Sequence[str], *, check: bool = True, timeout: float = _CALL_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside the sandbox's pid and mount namespaces, as root."""
        if not self.pid:
            raise SandboxError("the system manager is not running")
        command = [
            _tool("nsenter", "util-linux"),
            f"--target={self.pid}",
            "--mount",
            "--pid",
            "--",
            *argv,
        ]
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env={
                "PATH": SYSTEM_PATH,
                "LANG": "C.UTF-8",
                "SYSTEMD_PAGER": "",
                "SYSTEMD_COLORS": "0",
            },
        )
        if check and result.returncode != 0:
            raise SandboxError(
                f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}"
            )
        return result

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``systemctl`` against the sandbox's system manager."""
        return self.run(["systemctl", "--no-pager", "--no-ask-password", *args], check=check)

    def add_user(self) -> Account:
        """A fresh account with its home in the sandbox's /home and its manager running.

        The manager is ``user@<uid>.service`` of the sandbox's system manager, with the
        runtime dir ``/run/user/<uid>`` that ``user-runtime-dir@<uid>.service`` mounts.
        """
        account = create_account(Path("/home"), create_home=False)
        self.users.append(account)
        home = self.path(account.home)
        home.mkdir(mode=0o700)
        os.chown(home, account.uid, account.gid)
        self.systemctl("start", f"user@{account.uid}.service")
        return account

    def stop(self) -> None:
        """Power the manager off (every process in its namespace ends), remove users and tree."""
        if self._stopped:
            return
        self._stopped = True
        atexit.unregister(self.stop)
        errors: list[str] = []
        if self.pid and _pid_alive(self.pid):
            # Immediate poweroff: no shutdown units needed; PID 1's exit ends its namespace.
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGRTMIN + 14)
            if not _poll(lambda: not _pid_alive(self.pid), self.timeout):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
        if self._proc is not None:
            try:
                self._proc.wait(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        for pid in _cgroup_pids([self._cgroup]):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self._cgroup.exists() and not _poll(
            lambda: _remove_cgroups([self._cgroup]), self.timeout
        ):
            errors.append(f"{self._cgroup} stayed populated")
        for account in self.users:
            try:
                remove_account(account)
            except (OSError, SandboxError) as exc:
                errors.append(str(exc))
        self.users.clear()
        if not self.keep:
            _remove_tree(self.root)
        if errors:
            raise SandboxError(f"system sandbox clean-up failed: {'; '.join(errors)}")

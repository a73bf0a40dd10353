"""The sandboxed `systemd --user` itself: boot, talk to, stop."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from provenanced.sandbox._proc import (
    _CALL_TIMEOUT,
    _JOIN_CGROUPS_AND_EXEC,
    _SUN_PATH_MAX,
    BOOTED_MARKER,
    SANDBOX_MARKER,
    SYSTEM_PATH,
    SYSTEMD_BINARY,
    SandboxError,
    StartStop,
    _cgroup_hierarchies,
    _cgroup_pids,
    _end_group,
    _marked_pids,
    _pid_alive,
    _poll,
    _remove_cgroups,
    _remove_tree,
    _tail,
)
from provenanced.sandbox.hmactivation import activate
from provenanced.sandbox.hmstore import (
    Generation,
    _store_hash,
    build_generation,
    example_units,
)
from provenanced.sandbox.quadlet import install_generator

# --- the sandboxed manager -------------------------------------------------------------------


class Sandbox(StartStop):
    """A private `systemd --user` in its own HOME and runtime dir; never the caller's manager."""

    def __init__(
        self,
        root: Path | None = None,
        *,
        keep: bool = False,
        timeout: float = 30.0,
        systemd_binary: Path = SYSTEMD_BINARY,
        unit_dirs: Sequence[Path] = (),
    ) -> None:
        self._owns_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="provenanced-sandbox-")) if root is None else root
        self.root = self.root.absolute()
        self.keep = keep
        self.timeout = timeout
        self.systemd_binary = systemd_binary
        # More search-path directories, after the admin tier (a vendor tier of a package root).
        self.unit_dirs = tuple(unit_dirs)
        self.home = self.root / "home"
        self.runtime_dir = self.root / "run"
        self.admin_dir = self.root / "etc/systemd/user"
        self.store = self.root / "nix/store"
        self.config_dir = self.home / ".config/systemd/user"
        # The manager runs generators from here only (SYSTEMD_GENERATOR_PATH), none of the host's.
        self.generator_dir = self.root / "lib/systemd/user-generators"
        # Plain quadlet's first source directory ($XDG_CONFIG_HOME/containers/systemd).
        self.quadlet_dir = self.home / ".config/containers/systemd"
        self.state_dir = self.root / "state"
        self.manager_log = self.root / "manager.log"
        self.generation: Generation | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._stopped = False
        self._marker = f"{SANDBOX_MARKER}={self.root}".encode()
        self._cgroups: list[Path] = []
        # The tree exists from here on; make sure an abandoned sandbox still goes away.
        atexit.register(self.stop)

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
            # The trailing colon prepends these to the default path instead of replacing it.
            SYSTEMD_UNIT_PATH=":".join(map(str, (self.admin_dir, *self.unit_dirs))) + ":",
            SYSTEMD_GENERATOR_PATH=str(self.generator_dir),
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
        for path in (
            self.home,
            self.admin_dir,
            self.store,
            self.config_dir,
            self.state_dir,
            self.generator_dir,
        ):
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

    def _manager_command(self) -> list[str]:
        """What finally runs as the manager; a real user's sandbox drops to that user first."""
        return [str(self.systemd_binary), "--user"]

    def _run_as(self) -> dict[str, Any]:
        """Credentials for the commands run against the manager (`subprocess` keywords)."""
        return {}

    def _own_home(self) -> None:
        """Give what was just written in HOME to its owner; the caller owns it already here."""

    def _manager_argv(self) -> list[str]:
        """The manager's command line, behind the cgroup-joining launcher when we have cgroups."""
        argv = self._manager_command()
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
                **self._run_as(),
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
        self._own_home()
        self.generation = gen
        if self.running:
            self.daemon_reload()
        return gen

    def install_quadlet(self) -> Path:
        """Put the quadlet stand-in among the manager's generators (effective at the next reload)."""
        return install_generator(self.generator_dir)


def boot(root: Path | None = None, keep: bool = False) -> Sandbox:
    """Create and start a sandbox in one call; the caller owns stop()."""
    sandbox = Sandbox(root, keep=keep)
    try:
        sandbox.start()
    except BaseException:
        sandbox.stop()
        raise
    return sandbox

"""``provenanced install`` / ``uninstall``: the service's unit files, enabled through D-Bus.

The user service goes to the user's own unit directory and its user manager; with ``--host``
the host-mode system service goes to /etc/systemd/system and the system manager.
Each unit file we write starts with ``HEADER``; that line is how a later install or uninstall
knows the file is ours. A file without it (a hand-written unit, a Home Manager link) is never
overwritten or removed.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import stat
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal

from provenanced import __version__
from provenanced.commands.portcheck import check_port
from provenanced.errors import ManagerCallError, ProvenancedError
from provenanced.expect.baseline import (
    BASELINE_FILE,
    entries_from_facts,
    load_baseline,
    save_baseline,
)
from provenanced.fs import atomic
from provenanced.fs.facts import FactReader
from provenanced.systemd import manager
from provenanced.systemd.bus import ManagerConnection

HEADER = "# Installed by provenanced install"
SERVICE = "provenanced.service"
SOCKET = "provenanced.socket"
HOST_SERVICE = "provenanced-host.service"
HOST_UNIT_DIR = Path("/etc/systemd/system")
# The system manager's own socket, as `systemctl` reaches it when run by root.
SYSTEM_MANAGER_ADDRESS = "unix:path=/run/systemd/private"
LISTEN_VARIABLE = "PROVENANCED_METRICS__LISTEN"
SCRIPT = "provenanced"
_PLACEHOLDER = "@BINDIR@/provenanced"
_PLAIN_PATH = re.compile(r"[A-Za-z0-9/._+@=-]+")
JOB_TIMEOUT = 90.0  # systemd's default TimeoutStartSec

Ownership = Literal["absent", "ours", "foreign"]


class InstallError(ProvenancedError):
    """A unit file in the way was not written by ``provenanced install``; nothing was changed."""

    exit_code = 2


@dataclass(slots=True)
class Outcome:
    """What install or uninstall did, line by line for the CLI, and whether it all worked."""

    lines: list[str] = field(default_factory=list)
    ok: bool = True


def unit_dir(env: Mapping[str, str]) -> Path:
    """``$XDG_CONFIG_HOME/systemd/user``: the user's own tier, where the manager looks first."""
    config_home = env.get("XDG_CONFIG_HOME") or os.path.join(env.get("HOME", "~"), ".config")
    return Path(config_home, "systemd", "user")


def packaged_unit(name: str) -> str:
    """The unit template shipped inside the package (a copy of packaging/systemd)."""
    return resources.files("provenanced").joinpath("data", name).read_text(encoding="utf-8")


def console_script(
    argv0: str = sys.argv[0], executable: str = sys.executable, path: str | None = None
) -> Path:
    """The installed ``provenanced`` script: the one running, else next to this Python, else PATH.

    Absolute but not resolved: a venv's bin/ or a pipx link stays valid across upgrades.
    """
    candidates = []
    if Path(argv0).name == SCRIPT:
        candidates.append(argv0)
    candidates.append(str(Path(executable).parent / SCRIPT))
    found = shutil.which(SCRIPT, path=path)
    if found:
        candidates.append(found)
    for candidate in candidates:
        absolute = Path(os.path.abspath(candidate))
        if absolute.is_file() and os.access(absolute, os.X_OK):
            return absolute
    raise InstallError(
        f"cannot find the installed {SCRIPT} console script (looked at {', '.join(candidates)}); "
        "install the package with pip first"
    )


def socket_listen() -> str:
    """The address the packaged provenanced.socket listens on (its ListenStream=)."""
    for line in packaged_unit(SOCKET).splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "ListenStream" and value.strip():
            return value.strip()
    raise InstallError(f"the packaged {SOCKET} has no ListenStream=")


def exec_path(script: Path) -> str:
    """``script`` as ExecStart='s first word: quoted if needed, ``%`` and ``$`` escaped."""
    text = str(script).replace("%", "%%").replace("$", "$$")
    if _PLAIN_PATH.fullmatch(str(script)):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_unit(name: str, script: Path, listen: str | None = None) -> str:
    """The unit file as installed: our header, then the template with ExecStart filled in.

    ``listen`` (``install --listen``) is where the service listens: the socket's ListenStream=,
    or the service's ``PROVENANCED_METRICS__LISTEN``, which overrides the configuration file.
    """
    host = name == HOST_SERVICE
    systemctl = "systemctl" if host else "systemctl --user"
    uninstall = "provenanced uninstall --host" if host else "provenanced uninstall"
    header = (
        f"{HEADER} {__version__}; `{uninstall}` removes it.\n"
        f"# Do not edit: `{systemctl} edit {name}` keeps changes in a drop-in.\n"
    )
    lines = []
    for line in packaged_unit(name).replace(_PLACEHOLDER, exec_path(script)).splitlines():
        key = line.partition("=")[0]
        if listen is not None and key == "ListenStream":
            line = f"ListenStream={listen}"
        lines.append(line)
        if listen is not None and key == "ExecStart":
            lines.append(f"Environment={LISTEN_VARIABLE}={listen}")
    return header + "\n".join(lines) + "\n"


def ownership(path: Path) -> Ownership:
    """Whether ``path`` is free, a regular file we wrote, or anything else (never followed)."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return "absent"
    if not stat.S_ISREG(st.st_mode):
        return "foreign"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as handle:
            first = handle.readline(len(HEADER) + 1)
    except OSError:
        return "foreign"  # what we cannot read, we did not write
    return "ours" if first.startswith(HEADER.encode()) else "foreign"


def check_free(directory: Path, names: Sequence[str]) -> None:
    """Refuse before touching anything when one of the files belongs to someone else."""
    for name in names:
        if ownership(directory / name) == "foreign":
            raise InstallError(
                f"{directory / name} exists and was not written by provenanced install; "
                "move it away to install, or keep managing it yourself"
            )


def write_units(directory: Path, units: Mapping[str, str]) -> list[str]:
    """Write each unit atomically (never through a symlink); returns the names that changed."""
    check_free(directory, list(units))
    changed = []
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for name, text in units.items():
            path = directory / name
            if ownership(path) == "ours" and path.read_text(encoding="utf-8") == text:
                continue
            atomic.write_file(str(directory), name, text.encode(), mode=0o644)
            changed.append(name)
    except OSError as exc:
        raise InstallError(
            f"cannot write the unit files in {directory}: {exc.strerror or exc}"
        ) from exc
    return changed


def remove_units(directory: Path, names: Sequence[str]) -> list[str]:
    """Remove the named files we wrote; others stay. Returns the names removed."""
    removed = []
    for name in names:
        if ownership(directory / name) == "ours":
            try:
                (directory / name).unlink()
            except OSError as exc:
                raise InstallError(
                    f"cannot remove {directory / name}: {exc.strerror or exc}"
                ) from exc
            removed.append(name)
    return removed


# --- the manager --------------------------------------------------------------------------------


async def _enable(conn: ManagerConnection, names: Sequence[str]) -> None:
    # EnableUnitFiles(files, runtime=false, force=true): replace a stale .wants link of ours.
    await conn.call("EnableUnitFiles", "asbb", [list(names), False, True])


async def _disable(conn: ManagerConnection, names: Sequence[str]) -> None:
    await conn.call("DisableUnitFiles", "asb", [list(names), False])


async def _run_job(conn: ManagerConnection, method: str, unit: str) -> str:
    """Start, restart or stop ``unit`` and wait for its job like ``systemctl``; the job result."""
    finished: dict[str, str] = {}
    arrived = asyncio.Event()

    def on_signal(event: manager.ManagerEvent) -> None:
        if isinstance(event, manager.JobRemoved):
            finished[event.job_path] = event.result
            arrived.set()

    await manager.subscribe(conn, on_signal)
    try:
        async with asyncio.timeout(JOB_TIMEOUT):
            (job,) = await conn.call(method, "ss", [unit, "replace"])
            while job not in finished:
                arrived.clear()
                await arrived.wait()
    except TimeoutError:
        return f"unfinished after {JOB_TIMEOUT:g} s"
    return finished[job]


async def install(
    conn: ManagerConnection,
    env: Mapping[str, str],
    *,
    socket: bool = False,
    now: bool = False,
    script: Path | None = None,
    state_dir: str | None = None,
    listen: str | None = None,
    configured_listen: str | None = None,
) -> Outcome:
    """Write (or update) the units, enable them, reload, and with ``now`` (re)start them.

    Args:
        state_dir: where the baseline lives; when one exists, say it needs re-accepting.
        listen: ``--listen``: the address written into the units.
        configured_listen: the address the service binds without ``listen`` (the socket's or
            the configuration's). Either is refused before anything is written when another
            user already listens on its port.
    """
    directory = unit_dir(env)
    script = script or console_script()
    names = [SERVICE, SOCKET] if socket else [SERVICE]
    check_free(directory, [SERVICE, SOCKET])
    bound = listen or configured_listen
    if bound is not None:
        check_port(bound, os.getuid())
    outcome = Outcome()
    had_baseline = state_dir is not None and _baseline_exists(state_dir)
    socket_removed = not socket and ownership(directory / SOCKET) == "ours"
    if socket_removed:
        # A plain install after an install --socket: the socket unit goes.
        await _stop_and_disable(conn, [SOCKET], outcome)
        remove_units(directory, [SOCKET])
        outcome.lines.append(f"removed {directory / SOCKET}")
    # With a socket the service binds nothing itself: the address goes to the socket only.
    rendered = {
        name: render_unit(name, script, None if socket and name == SERVICE else listen)
        for name in names
    }
    changed = write_units(directory, rendered)
    for name in names:
        verb = "wrote" if name in changed else "up to date:"
        outcome.lines.append(f"{verb} {directory / name}")
    outcome.lines.append(f"ExecStart={script} run")
    await _enable(conn, names)
    await manager.reload(conn)
    targets = {SERVICE: "default.target", SOCKET: "sockets.target"}
    outcome.lines.append("enabled " + ", ".join(f"{n} (in {targets[n]})" for n in names))
    if now:
        await _start(conn, changed, socket, socket_removed, outcome)
    elif changed or socket_removed:
        outcome.lines.append("start it with: systemctl --user restart provenanced.service")
    if had_baseline and state_dir is not None:
        vouched = _vouch_for_own_files(state_dir, directory, names)
        outcome.lines.append(f"the accepted baseline now vouches for {vouched} files install wrote")
    return outcome


def _baseline_exists(state_dir: str) -> bool:
    return os.path.exists(os.path.join(state_dir, BASELINE_FILE))


def _vouch_for_own_files(state_dir: str, directory: Path, names: Sequence[str]) -> int:
    """Add the units and enablement links install wrote to the baseline, so they are not drift."""
    targets = {SERVICE: "default.target", SOCKET: "sockets.target"}
    paths = [str(directory / n) for n in names] + [
        str(directory / f"{targets[n]}.wants" / n) for n in names
    ]
    accepted = load_baseline(state_dir) or {}
    own = entries_from_facts(FactReader().read_many(paths).values())
    save_baseline(state_dir, {**accepted, **own})
    return len(own)


async def _start(
    conn: ManagerConnection,
    changed: Sequence[str],
    socket: bool,
    socket_removed: bool,
    out: Outcome,
) -> None:
    """Bring the units up; whatever changed restarts, so the new definition runs now."""
    jobs: list[tuple[str, str]] = []
    if socket and SOCKET in changed:
        # The running service holds the old listening fd; it must let go before the socket rebinds.
        jobs += [("StopUnit", SERVICE), ("RestartUnit", SOCKET)]
    elif socket:
        jobs.append(("StartUnit", SOCKET))
    restart = bool(changed) or socket_removed
    jobs.append(("RestartUnit" if restart else "StartUnit", SERVICE))
    for method, name in jobs:
        result = await _run_job(conn, method, name)
        if result != "done":
            out.ok = False
            out.lines.append(
                f"{name} did not start (job {result}); see systemctl --user status {name}"
            )
        elif method != "StopUnit":
            out.lines.append(f"started {name}")


async def _stop_and_disable(conn: ManagerConnection, names: Sequence[str], out: Outcome) -> None:
    """Stop, forget a failed state (a failed unit stays loaded after its file is gone), disable."""
    for name in names:
        result = await _run_job(conn, "StopUnit", name)
        if result != "done":
            out.ok = False
            out.lines.append(f"stopping {name} ended with job result {result}")
        try:
            await conn.call("ResetFailedUnit", "s", [name])
        except ManagerCallError as exc:
            if not exc.error_name.endswith("NoSuchUnit"):
                raise
    await _disable(conn, names)


async def uninstall(conn: ManagerConnection, env: Mapping[str, str]) -> Outcome:
    """Stop and disable the units, remove the files we wrote, reload; other files stay."""
    directory = unit_dir(env)
    outcome = Outcome()
    ours = [name for name in (SOCKET, SERVICE) if ownership(directory / name) == "ours"]
    foreign = [name for name in (SERVICE, SOCKET) if ownership(directory / name) == "foreign"]
    if ours:
        await _stop_and_disable(conn, ours, outcome)
        outcome.lines.append(f"stopped and disabled {', '.join(ours)}")
    for name in remove_units(directory, ours):
        outcome.lines.append(f"removed {directory / name}")
    await manager.reload(conn)
    for name in foreign:
        outcome.lines.append(f"left {directory / name} alone: not written by provenanced install")
    for name in (SERVICE, SOCKET):
        dropins = directory / f"{name}.d"
        if dropins.is_dir() and not dropins.is_symlink():
            outcome.lines.append(f"left your drop-ins in {dropins}")
    if not ours and not foreign:
        outcome.lines.append(f"nothing to uninstall in {directory}")
    return outcome


# --- host mode: the system service --------------------------------------------------------------


async def install_host(
    conn: ManagerConnection,
    *,
    now: bool = False,
    script: Path | None = None,
    listen: str | None = None,
    configured_listen: str,
    directory: Path = HOST_UNIT_DIR,
) -> Outcome:
    """Write (or update) the host-mode system unit, enable it, reload, with ``now`` (re)start it.

    Refused before anything is written when a user's own daemon holds the port it would bind.
    """
    if os.geteuid() != 0:
        raise InstallError("install --host writes a system unit and must run as root")
    script = script or console_script()
    check_free(directory, [HOST_SERVICE])
    check_port(listen or configured_listen, 0, host=True)
    outcome = Outcome()
    changed = write_units(directory, {HOST_SERVICE: render_unit(HOST_SERVICE, script, listen)})
    verb = "wrote" if changed else "up to date:"
    outcome.lines += [f"{verb} {directory / HOST_SERVICE}", f"ExecStart={script} run --host"]
    await _enable(conn, [HOST_SERVICE])
    await manager.reload(conn)
    outcome.lines.append(f"enabled {HOST_SERVICE} (in multi-user.target)")
    if now:
        # What changed restarts, so the new definition runs now.
        result = await _run_job(conn, "RestartUnit" if changed else "StartUnit", HOST_SERVICE)
        if result == "done":
            outcome.lines.append(f"started {HOST_SERVICE}")
        else:
            outcome.ok = False
            outcome.lines.append(
                f"{HOST_SERVICE} did not start (job {result}); see systemctl status {HOST_SERVICE}"
            )
    elif changed:
        outcome.lines.append(f"start it with: systemctl restart {HOST_SERVICE}")
    return outcome


async def uninstall_host(conn: ManagerConnection, directory: Path = HOST_UNIT_DIR) -> Outcome:
    """Stop and disable the system unit, remove it if we wrote it, reload; the state stays."""
    if os.geteuid() != 0:
        raise InstallError("uninstall --host changes a system unit and must run as root")
    outcome = Outcome()
    path = directory / HOST_SERVICE
    state = ownership(path)
    if state == "ours":
        await _stop_and_disable(conn, [HOST_SERVICE], outcome)
        outcome.lines.append(f"stopped and disabled {HOST_SERVICE}")
        remove_units(directory, [HOST_SERVICE])
        outcome.lines.append(f"removed {path}")
        await manager.reload(conn)
        outcome.lines.append("kept the per-user state in /var/lib/provenanced")
    elif state == "foreign":
        outcome.lines.append(f"left {path} alone: not written by provenanced install")
    else:
        outcome.lines.append(f"nothing to uninstall in {directory}")
    dropins = directory / f"{HOST_SERVICE}.d"
    if dropins.is_dir() and not dropins.is_symlink():
        outcome.lines.append(f"left your drop-ins in {dropins}")
    return outcome

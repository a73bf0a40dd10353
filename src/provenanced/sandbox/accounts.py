"""Real, throw-away unprivileged accounts (useradd/userdel) for host-mode tests; root only.

Each account's comment names the process that created it and that process's start time, so a
later run removes what a killed run left behind, and never an account a live run still uses.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from provenanced.sandbox._proc import _CALL_TIMEOUT, SYSTEM_PATH, SandboxError, _poll, _tool

ACCOUNT_PREFIX = "pvtest-"
_COMMENT = "provenanced test account pid={pid} start={start}"
_COMMENT_PATTERN = re.compile(r"provenanced test account pid=(\d+) start=(\d+)$")
_NOLOGIN = next(
    (s for s in ("/usr/sbin/nologin", "/sbin/nologin") if os.path.exists(s)), "/bin/false"
)
# useradd and userdel take a lock on /etc/passwd; concurrent test runs wait their turn.
_LOCK_ATTEMPTS = 20
_LOCK_BACKOFF = 0.1
_USERDEL_NO_SUCH_USER = 6


@dataclass(frozen=True, slots=True)
class Account:
    """An unprivileged account: its name, ids, supplementary groups and home."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: Path

    @classmethod
    def lookup(cls, name: str) -> Account:
        """Read an existing account from the password and group databases."""
        entry = pwd.getpwnam(name)
        groups = tuple(sorted(set(os.getgrouplist(name, entry.pw_gid))))
        return cls(name, entry.pw_uid, entry.pw_gid, groups, Path(entry.pw_dir))


def _start_time(pid: int) -> int | None:
    """The start time of a process in clock ticks since boot: with the pid, who it is."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _own_comment() -> str:
    pid = os.getpid()
    return _COMMENT.format(pid=pid, start=_start_time(pid))


def _run_locked(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run useradd/userdel, retrying while another run holds the password file lock."""
    for _ in range(_LOCK_ATTEMPTS):
        result = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=_CALL_TIMEOUT,
            check=False,
            env={"PATH": SYSTEM_PATH, "LANG": "C.UTF-8"},
        )
        if result.returncode == 0 or "lock" not in result.stderr.lower():
            return result
        time.sleep(_LOCK_BACKOFF)
    return result


def create_account(
    base_dir: Path, prefix: str = ACCOUNT_PREFIX, *, create_home: bool = True
) -> Account:
    """Create a fresh account with a private home under ``base_dir``; no fixed uid.

    Without ``create_home`` the home is only named: it lives in another mount namespace.
    """
    if os.geteuid() != 0:
        raise SandboxError("creating test accounts needs root")
    if create_home:
        base_dir.mkdir(parents=True, exist_ok=True)
    name = f"{prefix}{secrets.token_hex(4)}"
    result = _run_locked(
        [
            _tool("useradd", "the passwd package"),
            "--create-home" if create_home else "--no-create-home",
            "--base-dir",
            str(base_dir),
            "--user-group",
            "--no-log-init",
            "--shell",
            _NOLOGIN,
            "--comment",
            _own_comment(),
            "--key",
            "HOME_MODE=0700",
            name,
        ]
    )
    if result.returncode != 0:
        raise SandboxError(f"useradd {name} failed ({result.returncode}): {result.stderr.strip()}")
    return Account.lookup(name)


def pids_of(uid: int) -> set[int]:
    """Live processes whose real, effective, saved or file-system uid is ``uid``.

    Zombies hold nothing and only their parent can reap them, so they do not count.
    """
    found = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            status = dict(
                line.split(":", 1) for line in Path(entry.path, "status").read_text().splitlines()
            )
        except (OSError, ValueError):
            continue
        if status.get("State", "Z").split()[0] in "ZX":
            continue
        if str(uid) in status.get("Uid", "").split():
            found.add(int(entry.name))
    found.discard(os.getpid())
    return found


def kill_processes(uid: int) -> None:
    """SIGKILL everything running as ``uid`` until nothing is left; the uid is ours alone."""

    def gone() -> bool:
        pids = pids_of(uid)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return not pids

    if not _poll(gone, _CALL_TIMEOUT):
        raise SandboxError(f"processes of uid {uid} survived SIGKILL: {sorted(pids_of(uid))}")


def remove_account(account: Account) -> None:
    """Kill the account's processes, then delete it, its group and its home; idempotent."""
    kill_processes(account.uid)
    result = _run_locked([_tool("userdel", "the passwd package"), "--remove", account.name])
    if result.returncode not in (0, _USERDEL_NO_SUCH_USER):
        # userdel has already dropped the passwd entry when only the home removal failed.
        with contextlib.suppress(KeyError):
            pwd.getpwnam(account.name)
            raise SandboxError(
                f"userdel {account.name} failed ({result.returncode}): {result.stderr.strip()}"
            )
    with contextlib.suppress(KeyError):
        grp.getgrnam(account.name)
        raise SandboxError(f"userdel {account.name} left its group behind")
    if account.home.exists():
        shutil.rmtree(account.home)


def _abandoned(entry: pwd.struct_passwd) -> bool:
    """Whether a test account's creator is gone: pid dead, or reused by another process."""
    match = _COMMENT_PATTERN.match(entry.pw_gecos)
    if not entry.pw_name.startswith(ACCOUNT_PREFIX) or match is None:
        return False
    pid, start = int(match[1]), int(match[2])
    return _start_time(pid) != start


def sweep_abandoned_accounts() -> list[str]:
    """Remove test accounts left by runs that died before their clean-up; returns their names."""
    removed = []
    for entry in pwd.getpwall():
        if _abandoned(entry):
            remove_account(Account.lookup(entry.pw_name))
            removed.append(entry.pw_name)
    return removed

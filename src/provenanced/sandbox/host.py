"""Real unprivileged users, each running its own `systemd --user`, as host mode sees them.

The runtime directories are laid out like `/run/user/<uid>` under a throw-away root (the host
daemon's `host.runtime_root`), so a daemon pointed there finds each manager by its uid.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from provenanced.sandbox._proc import SYSTEM_PATH, SandboxError, _remove_tree, _tool
from provenanced.sandbox.accounts import (
    Account,
    create_account,
    pids_of,
    remove_account,
    sweep_abandoned_accounts,
)
from provenanced.sandbox.usermanager import Sandbox

RUNTIME_ROOT_ENV = "PROVENANCED_HOST__RUNTIME_ROOT"
# systemd delegates these files with a cgroup (src/shared/cgroup-setup.c, cg_set_access()):
# cgroup v1 first, then v2. The rest stay root's, as under a real user@.service.
_DELEGATED_FILES = (
    "cgroup.procs",
    "tasks",
    "cgroup.clone_children",
    "cgroup.subtree_control",
    "cgroup.threads",
)


def _make_dir(path: Path, mode: int, owner: Account | None = None) -> None:
    """Create ``path`` (and missing parents, with the same mode and owner) unless it exists."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    for directory in reversed(missing):
        directory.mkdir()
        directory.chmod(mode)
        if owner is not None:
            os.chown(directory, owner.uid, owner.gid)


def give_tree(path: Path, owner: Account) -> None:
    """Make ``owner`` own everything under ``path``, links themselves included, never followed."""
    os.chown(path, owner.uid, owner.gid, follow_symlinks=False)
    for dirpath, dirs, files in os.walk(path):
        for name in (*dirs, *files):
            os.chown(os.path.join(dirpath, name), owner.uid, owner.gid, follow_symlinks=False)


class UserSandbox(Sandbox):
    """A real user's `systemd --user`: runs under the account's uid, gids and cgroup delegation.

    ``root`` keeps what is not the user's (the manager log, the admin tier, the state dir); the
    home is the account's own and the runtime dir is ``<runtime_root>/<uid>``, mode 0700.
    """

    def __init__(
        self,
        account: Account,
        root: Path,
        runtime_root: Path,
        store: Path,
        *,
        timeout: float = 30.0,
    ) -> None:
        super().__init__(root, timeout=timeout)
        self.account = account
        self.home = account.home
        self.config_dir = self.home / ".config/systemd/user"
        self.runtime_dir = runtime_root.absolute() / str(account.uid)
        self.store = store.absolute()

    @property
    def env(self) -> dict[str, str]:
        """The user's own environment: what their shell and their manager see."""
        return {**super().env, "USER": self.account.name, "LOGNAME": self.account.name}

    def _manager_env(self) -> dict[str, str]:
        return {**super()._manager_env(), "USER": self.account.name, "LOGNAME": self.account.name}

    def _make_dirs(self) -> None:
        """The admin tier and state stay root's (readable); the user's dirs belong to the user."""
        for path in (self.root, self.admin_dir, self.store, self.state_dir):
            _make_dir(path, 0o755)
        _make_dir(self.config_dir, 0o755, self.account)
        _make_dir(self.runtime_dir.parent, 0o755)
        _make_dir(self.runtime_dir, 0o700, self.account)

    def _make_cgroups(self) -> list[Path]:
        """Delegate the manager's cgroups to the user, as logind does for user@.service."""
        cgroups = super()._make_cgroups()
        for cgroup in cgroups:
            os.chown(cgroup, self.account.uid, self.account.gid)
            for name in _DELEGATED_FILES:
                with contextlib.suppress(FileNotFoundError):
                    os.chown(cgroup / name, self.account.uid, self.account.gid)
        return cgroups

    def _manager_command(self) -> list[str]:
        """Drop to the user (all of uid, gid, groups) after joining the cgroups, then exec."""
        setpriv = _tool("setpriv", "util-linux")
        ids = [f"--reuid={self.account.uid}", f"--regid={self.account.gid}"]
        groups = ",".join(str(g) for g in self.account.groups)
        return [setpriv, *ids, f"--groups={groups}", "--", *super()._manager_command()]

    def _run_as(self) -> dict[str, Any]:
        """`systemctl --user` runs as the user: as root it refuses a manager of another uid."""
        return {
            "user": self.account.uid,
            "group": self.account.gid,
            "extra_groups": list(self.account.groups),
        }

    def _own_home(self) -> None:
        give_tree(self.home, self.account)

    def stop(self) -> None:
        """Stop the manager, then remove its runtime dir, as logind does when a user leaves."""
        try:
            super().stop()
        finally:
            _remove_tree(self.runtime_dir)
            _remove_tree(self.root)

    def _leftover_pids(self) -> set[int]:
        """Everything the uid runs counts: a user's process may leave the manager's cgroup."""
        return super()._leftover_pids() | pids_of(self.account.uid)


class HostSandbox:
    """Throw-away accounts, each with a real `systemd --user`, under one root; root only.

    Accounts, processes, cgroups and files are removed by stop(), at exit, or by the next
    sandbox when this process died first (see accounts.sweep_abandoned_accounts).
    """

    def __init__(self, *, keep: bool = False, timeout: float = 30.0) -> None:
        if os.geteuid() != 0:
            raise SandboxError("a host sandbox creates real accounts and needs root")
        sweep_abandoned_accounts()
        self.root = Path(tempfile.mkdtemp(prefix="provenanced-host-"))
        # Users walk through it to their homes, their runtime dirs and the store.
        self.root.chmod(0o755)
        self.keep = keep
        self.timeout = timeout
        self.runtime_root = self.root / "run/user"
        self.homes = self.root / "home"
        self.store = self.root / "nix/store"
        for path in (self.runtime_root, self.homes, self.store):
            _make_dir(path, 0o755)
        self.users: list[UserSandbox] = []
        self._stopped = False
        atexit.register(self.stop)

    def __enter__(self) -> HostSandbox:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def env(self) -> dict[str, str]:
        """Environment for a host daemon that should find these users' managers."""
        return {RUNTIME_ROOT_ENV: str(self.runtime_root), "PATH": SYSTEM_PATH, "LANG": "C.UTF-8"}

    def add_user(self, files: Mapping[str, str] | None = None, *, boot: bool = True) -> UserSandbox:
        """A new account with a Home Manager tree (``files``, default the example units).

        With ``boot`` its manager runs when this returns; otherwise call ``start()``.
        """
        if self._stopped:
            raise SandboxError("this host sandbox was stopped; create a new one")
        account = create_account(self.homes)
        try:
            user = UserSandbox(
                account,
                self.root / "users" / account.name,
                self.runtime_root,
                self.store,
                timeout=self.timeout,
            )
        except BaseException:
            remove_account(account)
            raise
        # From here on stop() removes the account, whatever fails next.
        self.users.append(user)
        user.install_home_manager(files)
        if boot:
            user.start()
        return user

    def remove_user(self, user: UserSandbox) -> None:
        """Stop the user's manager and delete the account, as when a user leaves the host."""
        try:
            user.stop()
        finally:
            remove_account(user.account)
            self.users.remove(user)

    def stop(self) -> None:
        """Stop every manager, delete every account and the tree; idempotent, goes on past errors."""
        if self._stopped:
            return
        self._stopped = True
        atexit.unregister(self.stop)
        errors: list[BaseException] = []
        for user in reversed(self.users):
            for step in (user.stop, lambda user=user: remove_account(user.account)):
                try:
                    step()
                except (OSError, SandboxError) as exc:
                    errors.append(exc)
        self.users.clear()
        if not self.keep:
            _remove_tree(self.root)
        if errors:
            raise SandboxError(f"host sandbox clean-up failed: {'; '.join(map(str, errors))}")

"""Home Manager's activation, replayed operation by operation as each release performs it.

A generation's `activate` script (see `build_generation`) runs this through `hmcli`, so the
sandbox activates the way Home Manager does: from a shell, or inside a unit. Sources read, in
nix-community/home-manager: modules/home-environment.nix, modules/lib-bash/activation-init.sh,
modules/files.nix, modules/files/check-link-targets.sh, modules/systemd.nix and
home-manager/home-manager, on release-24.11, release-25.11 and master. The order:

- 25.11 and master: (CLI: profile set) → `gcroots/new-home` → checkLinkTargets (read only) →
  writeBoundary (profile set when the driver version is 0) → installPackages → linkGeneration
  (cleanup, then link) → entries after it (onFilesChange, …) → reloadSystemd (sd-switch) →
  `gcroots/current-home` → exit trap removes `new-home`.
- 24.11: no `new-home`; checkLinkTargets → installPackages → linkGeneration: cleanup, *then the
  profile and `current-home`*, then link → entries → reloadSystemd.
- 25.11 links every file with `ln -Tsf` (GNU ln: `CuXXXXXX` temp link renamed over an existing
  one); master batches `ln -sfn -t DIR` per directory and skips links already right.
"""

from __future__ import annotations

import filecmp
import fnmatch
import os
import shutil
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from provenanced.sandbox._proc import SYSTEM_PATH, SandboxError
from provenanced.sandbox.fsops import (
    OpLog,
    ln_force,
    ln_into,
    mkdir_p,
    mv_noreplace,
    nix_add_root,
    nix_env_set,
    rm,
    rmdir_parents,
)
from provenanced.sandbox.hmstore import Generation, find_files
from provenanced.sandbox.sdswitch import Systemctl, sd_switch

KNOBS_FILE = "hm-switch.json"  # in the sandbox root: what only the sandbox can tune
_UNITS = ".config/systemd/user"
_SYSTEMCTL_TIMEOUT = 120.0


@dataclass(frozen=True, slots=True)
class Options:
    """How one activation runs: Home Manager's own switches and the sandbox's timing knobs."""

    backup_ext: str | None = None  # `home-manager switch -b EXT`, HOME_MANAGER_BACKUP_EXT
    backup_overwrite: bool = False  # HOME_MANAGER_BACKUP_OVERWRITE (25.11 and master only)
    install_seconds: float = 0.0  # installPackages: `nix-env -i` of home-manager-path
    entries_seconds: float = 0.0  # entries between linkGeneration and reloadSystemd
    start_services: bool = True  # systemd.user.startServices: sd-switch, else "suggest"


def _readlink(path: Path) -> str:
    """`$(readlink PATH)`: the link text, or empty for anything that is not a link."""
    try:
        return os.readlink(path)
    except OSError:
        return ""


def _resolve(path: Path) -> Path | None:
    """`readlink -e PATH`: the canonical path when every component exists."""
    try:
        return Path(os.path.realpath(path, strict=True))
    except OSError:
        return None


def _same_content(source: Path, target: Path) -> bool:
    """`cmp -s SOURCE TARGET`, following links; anything unreadable differs."""
    try:
        return filecmp.cmp(source, target, shallow=False)
    except OSError:
        return False


def _own_unit() -> str:
    """The unit whose cgroup this process runs in, or `-` when started from a shell."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return "-"
    leaves = [line.rsplit("/", 1)[-1] for line in lines]
    units = [leaf for leaf in leaves if leaf.endswith(".service")]
    return units[0] if units and os.environ.get("INVOCATION_ID") else "-"


def systemctl_for(env: Mapping[str, str]) -> Systemctl:
    """`systemctl --user` against the manager that ``env`` names (never the caller's own)."""
    exe = shutil.which("systemctl", path=SYSTEM_PATH) or "systemctl"

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = [exe, "--user", "--no-pager", *args]
        try:
            result = subprocess.run(
                argv,
                env=dict(env),
                capture_output=True,
                text=True,
                timeout=_SYSTEMCTL_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise SandboxError(f"{' '.join(argv)} timed out") from exc
        if check and result.returncode != 0:
            raise SandboxError(f"{' '.join(argv)} failed: {result.stderr.strip()}")
        return result

    return run


class _Activation:
    """One run of a generation's activation script."""

    def __init__(
        self,
        home: Path,
        gen: Generation,
        options: Options,
        driver_version: int,
        manager_env: Mapping[str, str] | None,
        log: OpLog,
    ) -> None:
        self.home, self.gen, self.options, self.log = home, gen, options, log
        self.driver_version = driver_version
        self.manager_env = manager_env
        self.legacy = gen.release == "24.11"
        self.store = gen.path.parent
        state = home / ".local/state"
        # activation-init.sh (release-25.11) L59-63: the paths every later step uses.
        self.profile = state / "nix/profiles/home-manager"
        self.new_root = state / "home-manager/gcroots/new-home"
        self.current_root = state / "home-manager/gcroots/current-home"
        # modules/files.nix (release-25.11) L180: what counts as a Home Manager link.
        self.pattern = f"{os.path.realpath(self.store)}/*-home-manager-files/*"
        self.old: Path | None = None

    def run(self) -> None:
        """The script from top to bottom, the exit trap included."""
        log = self.log
        log.phase("activation-start", f"release={self.gen.release} unit={_own_unit()}")
        # activation-init.sh (release-25.11) L139-140: `nix-env -q` makes the profiles directory.
        mkdir_p(log, self.profile.parent)
        self.old = self._old_generation()
        if not self.legacy:
            # home-environment.nix (release-25.11) L836-840: a temporary GC root first, removed
            # by the EXIT trap whatever happens; Nix writes it as `new-home.tmp-PID-N` + rename.
            nix_add_root(log, self.store, self.new_root, self.gen.path)
        try:
            self._check_link_targets()
            self._write_boundary()
            # modules/lib/dag.nix (release-25.11) L86-103 sorts the entries with nixpkgs'
            # toposort over their names: installPackages, merely after writeBoundary, runs
            # before linkGeneration; entries after linkGeneration named before reloadSystemd
            # (onFilesChange, …) run between the links and sd-switch.
            log.phase("installPackages")
            time.sleep(self.options.install_seconds)
            self._link_generation()
            log.phase("onFilesChange")
            time.sleep(self.options.entries_seconds)
            self._reload_systemd()
            if not self.legacy:
                # home-environment.nix (release-25.11) L844-846: current-home moves last.
                log.phase("current-home")
                nix_add_root(log, self.store, self.current_root, self.gen.path)
        finally:
            if not self.legacy:
                log.phase("exit-trap")
                rm(log, self.new_root, force=True)
        log.phase("activation-end")

    def _old_generation(self) -> Path | None:
        """`oldGenPath`: from current-home (25.11 L66-69), from the profile up to 24.11 (L78-81)."""
        return _resolve(self.profile if self.legacy else self.current_root)

    # --- checkLinkTargets ----------------------------------------------------------------------

    def _check_link_targets(self) -> None:
        """files/check-link-targets.sh (release-25.11) L13-69, master L42-107: read only."""
        self.log.phase("checkLinkTargets")
        new_files = self.gen.home_files
        collisions = []
        for source in find_files(new_files):
            target = self.home / os.path.relpath(source, new_files)
            # L27-28: an existing path that is not a link into a Home Manager generation.
            if os.path.exists(target) and not fnmatch.fnmatchcase(_readlink(target), self.pattern):
                problem = self._collision(source, target)
                if problem:
                    collisions.append(problem)
        if collisions:
            raise SandboxError(f"{'; '.join(collisions)} (-b EXT moves files aside)")

    def _collision(self, source: Path, target: Path) -> str:
        """check-link-targets.sh (release-25.11) L30-49: why ``target`` may not be replaced."""
        if _same_content(source, target):
            return ""  # L30-32: identical content is fine (the link step leaves it alone)
        ext = self.options.backup_ext
        if target.is_symlink() or not ext:
            return f"existing file {target} is in the way of Home Manager's link"
        backup = target.with_name(f"{target.name}.{ext}")
        overwrite = self.options.backup_overwrite and not self.legacy
        if os.path.exists(backup) and not overwrite:
            return f"existing file {backup} would be clobbered by backing up {target}"
        return ""

    # --- writeBoundary ---------------------------------------------------------------------------

    def _write_boundary(self) -> None:
        """home-environment.nix (release-25.11) L659-667: driver 0 sets the profile here."""
        self.log.phase("writeBoundary")
        if self.legacy or self.driver_version >= 1 or self.old == self.gen.path:
            return  # release-24.11 home-environment.nix L588: empty
        nix_env_set(self.log, self.store, self.profile, self.gen.path)

    # --- linkGeneration --------------------------------------------------------------------------

    def _link_generation(self) -> None:
        """files.nix (release-25.11) L139-243: clean the old generation's links, then link."""
        self.log.phase("linkGeneration")
        self._clean_old_generation()
        if self.legacy and self.old != self.gen.path:
            # files.nix (release-24.11) L217-238: profile and current-home between the two.
            nix_env_set(self.log, self.store, self.profile, self.gen.path)
            nix_add_root(self.log, self.store, self.current_root, self.gen.path)
        if self.gen.release == "master":
            self._link_batched()
        else:
            for source in find_files(self.gen.home_files):
                self._link_one(source)

    def _clean_old_generation(self) -> None:
        """files.nix (release-25.11) cleanOldGen L222-238 and its cleanup script L175-210."""
        if self.old is None or not (self.old / "home-files").exists():
            return
        self.log.phase("cleanup")
        old_files = Path(os.path.realpath(self.old / "home-files"))
        for old in find_files(old_files):
            relative = os.path.relpath(old, old_files)
            target = self.home / relative
            if os.path.exists(self.gen.home_files / relative):
                continue  # L186-187: still in the new generation
            if not fnmatch.fnmatchcase(_readlink(target), self.pattern):
                continue  # L188-189: not a Home Manager link; left alone
            rm(self.log, target)  # L192
            rmdir_parents(self.log, self.home, os.path.dirname(relative))  # L195-207

    def _backup(self, target: Path) -> None:
        """files.nix (release-25.11) L149-161: move a file in the way to `NAME.EXT`."""
        ext = self.options.backup_ext
        if not ext or not os.path.exists(target) or target.is_symlink():
            return
        backup = target.with_name(f"{target.name}.{ext}")
        if not self.legacy and self.options.backup_overwrite and os.path.exists(backup):
            rm(self.log, backup)
        try:
            mv_noreplace(self.log, target, backup)
        except (OSError, SandboxError) as exc:
            self.log.add("note", target, f"moving failed: {exc}")  # `|| errorEcho`: goes on

    def _link_one(self, source: Path) -> None:
        """files.nix (release-25.11) L146-172: back up, skip an identical file, else `ln -Tsf`."""
        target = self.home / os.path.relpath(source, self.gen.home_files)
        self._backup(target)
        if os.path.exists(target) and not target.is_symlink() and _same_content(source, target):
            self.log.add("note", target, "identical file left in place")
            return
        mkdir_p(self.log, target.parent)
        ln_force(self.log, str(source), target)

    def _link_batched(self) -> None:
        """files.nix (master) L189-305: classify, relink only stale links, one `ln` per dir."""
        new: list[Path] = []
        links: list[Path] = []
        slow: list[Path] = []
        for source in find_files(self.gen.home_files):
            target = self.home / os.path.relpath(source, self.gen.home_files)
            if target.parent.is_symlink():
                slow.append(source)  # L207-213: a linked parent keeps the per-file path
            elif target.is_symlink():
                links.append(source)
            elif os.path.exists(target):
                slow.append(source)  # L217-218: a real file in the way
            else:
                new.append(source)
        # L227-235: after the loop, one readlink over every existing link; only those not
        # already pointing at the new source join the links to make, behind the new ones.
        for source in links:
            target = self.home / os.path.relpath(source, self.gen.home_files)
            if _readlink(target) != str(source):
                new.append(source)
        pending: dict[Path, list[str]] = {}
        for source in new:
            target = self.home / os.path.relpath(source, self.gen.home_files)
            pending.setdefault(target.parent, []).append(str(source))
        for directory in pending:  # L250-256: one `mkdir -p` for the missing directories
            if not directory.is_dir():
                mkdir_p(self.log, directory)
        # L264-274: bash walks its associative array in hash order; first-seen order here.
        for directory, sources in pending.items():
            ln_into(self.log, directory, sources)
        for source in slow:  # L278-304: the 25.11 per-file logic
            self._link_one(source)

    # --- reloadSystemd ---------------------------------------------------------------------------

    def _reload_systemd(self) -> None:
        """systemd.nix (release-25.11) L460-518: sd-switch when the user manager runs."""
        self.log.phase("reloadSystemd")
        if self.manager_env is None:
            self.log.add("note", "reloadSystemd", "no user manager given: skipped")
            return
        systemctl = systemctl_for(self.manager_env)
        status = systemctl("is-system-running", check=False).stdout.strip()
        if status not in ("running", "degraded"):
            self.log.add("note", "reloadSystemd", f"manager {status or 'unreachable'}: skipped")
            return
        old_units = self.old / "home-files" / _UNITS if self.old is not None else None
        if old_units is not None and not old_units.exists():
            old_units = None
        new_units = self.gen.path / "home-files" / _UNITS
        if self.options.start_services:
            sd_switch(systemctl, self.log, old_units, new_units)
        else:
            # systemd-activate.sh (release-24.11) L110-119: reload, then only suggest commands.
            self.log.add("systemctl", "daemon-reload")
            systemctl("daemon-reload")
            self.log.add("systemctl-done", "daemon-reload")


def activate(
    home: Path,
    gen: Generation,
    *,
    driver_version: int = 0,
    options: Options | None = None,
    manager_env: Mapping[str, str] | None = None,
    log: OpLog | None = None,
) -> OpLog:
    """Run ``gen``'s activation script (`<gen>/activate [--driver-version N]`) against ``home``.

    Args:
        driver_version: 0 (what a bare `activate` does) sets the profile itself at
            writeBoundary; 1 (the CLI, the NixOS system unit) leaves it to the caller.
        manager_env: environment naming the user manager sd-switch talks to; None skips
            reloadSystemd, as Home Manager does when no user manager runs.
    """
    log = log if log is not None else OpLog()
    _Activation(home, gen, options or Options(), driver_version, manager_env, log).run()
    return log


def switch(
    home: Path,
    gen: Generation,
    *,
    options: Options | None = None,
    manager_env: Mapping[str, str] | None = None,
    log: OpLog | None = None,
) -> OpLog:
    """`home-manager switch` (home-manager/home-manager, release-25.11 L742-836)."""
    log = log if log is not None else OpLog()
    log.phase("home-manager-switch")
    if (gen.path / "gen-version").exists():
        # L828-830: the CLI moves the profile before the activation starts (L836).
        profile = home / ".local/state/nix/profiles/home-manager"
        mkdir_p(log, profile.parent)
        nix_env_set(log, gen.path.parent, profile, gen.path)
    # L813-815: a generation without gen-version manages its profile itself.
    return activate(home, gen, driver_version=1, options=options, manager_env=manager_env, log=log)

"""Where a Home Manager switch runs: a shell, or one of the units that wrap the activation.

- `standalone`: `home-manager switch` from a shell; no unit at all.
- `system`: the NixOS module's system unit `home-manager-<user>.service` (nixos/default.nix,
  release-25.11 L49-109) runs `<gen>/activate --driver-version 1` as the user. The sandbox has
  no system manager, so only what the user manager sees is reproduced: an activation started
  outside it, with the user session's variables imported (L98-103), that leaves the profile
  alone. The unit itself, its `Type=oneshot` and its `activating` state are not modelled.
- `user-service`: master's `startAsUserService` (nixos/default.nix, master L124-162): the user
  unit `home-manager.service` (`Type=oneshot`, `RemainAfterExit=yes`) whose drop-in sets
  `ExecStart=<gen>/activate`, restarted by the system switch. Its unit and drop-in are links
  into the store in the admin directory (really `/etc/systemd/user` and the data directory of
  `/etc/profiles/per-user/<user>`).
- `auto-upgrade`: `services.home-manager.autoUpgrade`'s `home-manager-auto-upgrade.service`
  (modules/services/home-manager-auto-upgrade.nix, release-25.11 L86-106): no `Type=`, so
  `Type=simple`, running `home-manager switch`. Part of the Home Manager generation itself.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Literal, get_args

from provenanced.sandbox._proc import _CALL_TIMEOUT, SANDBOX_MARKER, SandboxError, _poll
from provenanced.sandbox.fsops import Op, OpLog, nix_make_symlink, read_oplog
from provenanced.sandbox.hmactivation import KNOBS_FILE, Options
from provenanced.sandbox.hmstore import (
    Generation,
    _publish_dir,
    _store_hash,
    _write_store_file,
)
from provenanced.sandbox.usermanager import Sandbox

Form = Literal["standalone", "system", "user-service", "auto-upgrade"]
FORMS: tuple[Form, ...] = get_args(Form)
USER_SERVICE = "home-manager.service"
AUTO_UPGRADE = "home-manager-auto-upgrade.service"
OPLOG_FILE = "hm-oplog.jsonl"
_NEXT_LINK = "hm-next"  # stands in for the channel the auto-upgrade would pull
_SWITCH_TIMEOUT = 300.0  # the system unit's TimeoutStartSec=5m
_UNITS = ".config/systemd/user"


def _activation_env(sandbox: Sandbox, options: Options) -> dict[str, str]:
    """The environment an activation gets outside the manager: the user's session, marked."""
    env = dict(sandbox.env)
    env[SANDBOX_MARKER] = str(sandbox.root)  # lets reloadSystemd talk to this manager only
    if options.backup_ext:
        env["HOME_MANAGER_BACKUP_EXT"] = options.backup_ext
    if options.backup_overwrite:
        env["HOME_MANAGER_BACKUP_OVERWRITE"] = "1"
    return env


def _write_knobs(sandbox: Sandbox, options: Options) -> Path:
    """Hand the sandbox-only knobs to an activation that runs in another process."""
    oplog = sandbox.root / OPLOG_FILE
    oplog.unlink(missing_ok=True)
    knobs = {**asdict(options), "oplog": str(oplog)}
    (sandbox.root / KNOBS_FILE).write_text(json.dumps(knobs))
    return oplog


def _store_link(link: Path, store_file: Path) -> None:
    """Point an admin-tier link at a store file the way an `/etc` switch does (temp + rename)."""
    if link.is_symlink() and Path(os.readlink(link)) == store_file:
        return
    link.parent.mkdir(parents=True, exist_ok=True)
    nix_make_symlink(OpLog(), link, str(store_file))


# --- the auto-upgrade unit ---------------------------------------------------------------------


def auto_upgrade_units(sandbox: Sandbox) -> dict[str, str]:
    """The timer and service `services.home-manager.autoUpgrade` adds to a generation."""
    script = (
        "#!/bin/sh\n"
        "# home-manager-auto-upgrade: the channel update is the prepared generation here.\n"
        f"exec {shlex.quote(sys.executable)} -m provenanced.sandbox.hmcli auto-upgrade "
        f"{sandbox.root / _NEXT_LINK}\n"
    )

    def fill(tmp: Path) -> None:
        (tmp / "bin").mkdir()
        (tmp / "bin/home-manager-auto-upgrade").write_text(script)
        (tmp / "bin/home-manager-auto-upgrade").chmod(0o555)

    app = _publish_dir(
        sandbox.store, f"{_store_hash('auto-upgrade', script)}-home-manager-auto-upgrade", fill
    )
    timer = AUTO_UPGRADE.replace(".service", ".timer")
    timer_text = (
        "[Install]\nWantedBy=timers.target\n\n[Timer]\nOnCalendar=weekly\nPersistent=true\n"
        f"Unit={AUTO_UPGRADE}\n\n[Unit]\nDescription=Home Manager upgrade timer\n"
    )
    return {
        f"{_UNITS}/{AUTO_UPGRADE}": (
            f"[Service]\nExecStart={app}/bin/home-manager-auto-upgrade\n\n"
            "[Unit]\nDescription=Home Manager upgrade\n"
        ),
        f"{_UNITS}/{timer}": timer_text,
        f"{_UNITS}/timers.target.wants/{timer}": timer_text,
    }


# --- the startAsUserService unit ---------------------------------------------------------------


def _user_service_text(options: Options) -> str:
    """nixos/default.nix (master) L13-40 and L125-133: the base unit, no ExecStart."""
    env = ['"QT_QPA_PLATFORM=offscreen"']
    if options.backup_ext:
        env.append(f'"HOME_MANAGER_BACKUP_EXT={options.backup_ext}"')
    if options.backup_overwrite:
        env.append('"HOME_MANAGER_BACKUP_OVERWRITE=1"')
    return (
        "[Unit]\nDescription=Home Manager environment for %u\nRequiresMountsFor=%h\n\n"
        f"[Service]\nEnvironment={' '.join(env)}\nRemainAfterExit=yes\n"
        "SyslogIdentifier=hm-activate-%u\nTimeoutStartSec=5m\nType=oneshot\n"
    )


def install_user_service(sandbox: Sandbox, gen: Generation, options: Options | None = None) -> None:
    """Place `home-manager.service` and its drop-in for ``gen`` (what a NixOS switch writes)."""
    options = options or Options()
    unit = _write_store_file(sandbox.store, USER_SERVICE, _user_service_text(options))
    # nixos/default.nix (master) L145-150: the per-user drop-in names this generation.
    dropin = _write_store_file(
        sandbox.store, "10-user-activation.conf", f"[Service]\nExecStart={gen.activate_script}\n"
    )
    _store_link(sandbox.admin_dir / USER_SERVICE, unit)
    _store_link(sandbox.admin_dir / f"{USER_SERVICE}.d" / "10-user-activation.conf", dropin)


# --- running a switch --------------------------------------------------------------------------


def _run(argv: list[str], env: dict[str, str]) -> None:
    """Run an activation process to its end; its one-line error becomes ours."""
    try:
        result = subprocess.run(
            argv, env=env, capture_output=True, text=True, timeout=_SWITCH_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise SandboxError(f"{argv[0]} did not finish within {_SWITCH_TIMEOUT}s") from exc
    if result.returncode != 0:
        raise SandboxError(result.stderr.strip() or f"{argv[0]} exited {result.returncode}")


def _wait_inactive(sandbox: Sandbox, unit: str) -> None:
    """A `Type=simple` start returns at once: wait for the activation inside to finish."""

    def done() -> bool:
        return sandbox.show(unit, "ActiveState")["ActiveState"] in ("inactive", "failed")

    if not _poll(done, _SWITCH_TIMEOUT):
        raise SandboxError(f"{unit} still runs after {_SWITCH_TIMEOUT}s")
    result = sandbox.show(unit, "Result")["Result"]
    if result != "success":
        raise SandboxError(f"{unit} ended with result {result}")


def prepare_switch(
    sandbox: Sandbox, gen: Generation, form: Form, options: Options | None = None
) -> None:
    """What happens before the activation starts that is not Home Manager's own work.

    The user unit's drop-in is rewritten by the NixOS switch (which also has the user manager
    re-read its units); the auto-upgrade's channel update is the pointer to ``gen`` here.
    """
    options = options or Options()
    if form == "user-service":
        install_user_service(sandbox, gen, options)
        sandbox.daemon_reload()
    elif form == "auto-upgrade":
        if options.backup_ext:
            raise ValueError("the auto-upgrade unit runs `home-manager switch` without -b")
        nix_make_symlink(OpLog(), sandbox.root / _NEXT_LINK, str(gen.path))
    elif form not in FORMS:
        raise ValueError(f"unknown form {form!r}; one of {FORMS}")


def run_switch(
    sandbox: Sandbox,
    gen: Generation,
    form: Form = "standalone",
    options: Options | None = None,
    *,
    prepared: bool = False,
) -> list[Op]:
    """Switch the sandbox's home to ``gen`` the way ``form`` does; return every operation.

    Args:
        prepared: `prepare_switch` already ran for this switch (to look at the activation alone).
    """
    options = options or Options()
    if sandbox._run_as():
        # A real account's switch runs as that account, and Nix's daemon writes its gcroots.
        raise SandboxError("switching the home of a real account is not modelled yet")
    if not prepared:
        prepare_switch(sandbox, gen, form, options)
    oplog = _write_knobs(sandbox, options)
    env = _activation_env(sandbox, options)
    if form == "standalone":
        argv = [sys.executable, "-m", "provenanced.sandbox.hmcli", "switch", str(gen.path)]
        _run([*argv, *(["-b", options.backup_ext] if options.backup_ext else [])], env)
    elif form == "system":
        _run([str(gen.activate_script), "--driver-version", "1"], env)
    elif form == "user-service":
        # nixos/default.nix (master) L159-161: the system switch restarts the user unit.
        sandbox.systemctl("restart", USER_SERVICE, timeout=_SWITCH_TIMEOUT)
    else:
        sandbox.systemctl("start", AUTO_UPGRADE, timeout=_CALL_TIMEOUT)
        _wait_inactive(sandbox, AUTO_UPGRADE)
    sandbox.generation = gen
    return read_oplog(oplog)

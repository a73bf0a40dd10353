"""The commands a sandbox generation's `activate` script and the wrapping units run.

`python -m provenanced.sandbox.hmcli activate GEN [--driver-version N]` is `<gen>/activate`;
`switch GEN [-b EXT]` is `home-manager switch`; `auto-upgrade POINTER` is the script of
`home-manager-auto-upgrade.service`. Home Manager's own switches come from its environment
variables; what only the sandbox tunes (delays, the operation log) from its knobs file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from provenanced.sandbox._proc import SANDBOX_MARKER, SandboxError
from provenanced.sandbox.fsops import OpLog
from provenanced.sandbox.hmactivation import KNOBS_FILE, Options, activate, switch
from provenanced.sandbox.hmstore import Generation


def _knobs(env: Mapping[str, str]) -> tuple[Options, OpLog]:
    """Options from Home Manager's environment variables plus the sandbox's knobs file."""
    root = env.get(SANDBOX_MARKER)
    knobs: dict[str, object] = {}
    if root and (Path(root) / KNOBS_FILE).exists():
        knobs = json.loads((Path(root) / KNOBS_FILE).read_text())
    options = Options(
        backup_ext=env.get("HOME_MANAGER_BACKUP_EXT") or None,
        backup_overwrite=bool(env.get("HOME_MANAGER_BACKUP_OVERWRITE")),
        install_seconds=float(str(knobs.get("install_seconds", 0.0))),
        entries_seconds=float(str(knobs.get("entries_seconds", 0.0))),
        start_services=bool(knobs.get("start_services", True)),
    )
    oplog = knobs.get("oplog")
    return options, OpLog(Path(str(oplog)) if oplog else None)


def main(argv: Sequence[str] | None = None) -> int:
    """`activate GEN [--driver-version N]`, `switch GEN [-b EXT]`, `auto-upgrade POINTER`."""
    parser = argparse.ArgumentParser(prog="python -m provenanced.sandbox.hmcli")
    sub = parser.add_subparsers(dest="command", required=True)
    run_activate = sub.add_parser("activate")
    run_activate.add_argument("generation", type=Path)
    run_activate.add_argument("--driver-version", type=int, choices=(0, 1), default=0)
    run_switch = sub.add_parser("switch")
    run_switch.add_argument("generation", type=Path)
    run_switch.add_argument("-b", dest="backup_ext")
    upgrade = sub.add_parser("auto-upgrade")
    upgrade.add_argument("pointer", type=Path)
    args = parser.parse_args(argv)
    env = dict(os.environ)
    if getattr(args, "backup_ext", None):
        env["HOME_MANAGER_BACKUP_EXT"] = (
            args.backup_ext
        )  # home-manager/home-manager (release-25.11) L1177-1179: -b exports it
    options, log = _knobs(env)
    # Only a sandbox's manager is ever switched: without the marker, no reloadSystemd at all.
    manager_env = env if SANDBOX_MARKER in env else None
    home = Path(env["HOME"])
    try:
        if args.command == "activate":
            gen = Generation.from_store(args.generation)
            activate(
                home,
                gen,
                driver_version=args.driver_version,
                options=options,
                manager_env=manager_env,
                log=log,
            )
        else:
            # modules/services/home-manager-auto-upgrade.nix (release-25.11) L32-36: the channel
            # update and build are the pointer to a prepared generation here.
            path = args.generation if args.command == "switch" else args.pointer.resolve()
            switch(
                home, Generation.from_store(path), options=options, manager_env=manager_env, log=log
            )
    except (SandboxError, OSError, ValueError) as exc:
        print(f"home-manager activation failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""sd-switch, Home Manager's unit switcher, as its documentation describes it.

modules/systemd.nix (release-25.11) L466-475 and L489-510 run
`sd-switch --old-units <old gen>/home-files/.config/systemd/user --new-units <new gen>/…` once
the links are in place, when the user manager is `running` or `degraded`. sd-switch is a
separate Rust program; what is modelled here is its documented behaviour: compare the two unit
directories, stop removed units that are active, `daemon-reload`, then restart changed active
units and start new units wanted by an active target, waiting for those jobs to finish.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from provenanced.sandbox._proc import _WANTS_DIR
from provenanced.sandbox.fsops import OpLog

Systemctl = Callable[..., subprocess.CompletedProcess[str]]
_RUNNING = frozenset({"active", "activating", "reloading"})


@dataclass(frozen=True, slots=True)
class Plan:
    """What one switch does to the manager, in the order it does it."""

    stop: tuple[str, ...]
    restart: tuple[str, ...]
    start: tuple[str, ...]


def _definitions(units_dir: Path | None) -> dict[str, bytes]:
    """Unit name → its file plus drop-ins, byte for byte: what "changed" is judged on."""
    found: dict[str, bytes] = {}
    if units_dir is None or not units_dir.is_dir():
        return found
    for entry in sorted(units_dir.iterdir()):
        if entry.is_dir() and entry.name.endswith(".d"):
            unit = entry.name.removesuffix(".d")
            for conf in sorted(entry.iterdir()):
                found[unit] = found.get(unit, b"") + conf.name.encode() + b"\0" + conf.read_bytes()
        elif not entry.is_dir():
            found[entry.name] = found.get(entry.name, b"") + b"\0" + entry.read_bytes()
    return found


def _wanted_by(units_dir: Path) -> dict[str, set[str]]:
    """Unit → the targets whose `.wants/` (or `.requires/`, `.upholds/`) directory names it."""
    wanted: dict[str, set[str]] = {}
    if not units_dir.is_dir():
        return wanted
    for entry in units_dir.iterdir():
        if entry.is_dir() and _WANTS_DIR.search(entry.name):
            target = _WANTS_DIR.sub("", entry.name)
            for unit in entry.iterdir():
                wanted.setdefault(unit.name, set()).add(target)
    return wanted


def _active_states(systemctl: Systemctl, units: Iterable[str]) -> dict[str, str]:
    """`systemctl --user show -p Id,ActiveState UNIT…`, one record per unit."""
    names = sorted(set(units))
    if not names:
        return {}
    out = systemctl("show", "--property=Id,ActiveState", *names).stdout
    states: dict[str, str] = {}
    for block in out.split("\n\n"):
        fields = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
        if "Id" in fields:
            states[fields["Id"]] = fields.get("ActiveState", "")
    return states


def plan(systemctl: Systemctl, old_units: Path | None, new_units: Path) -> Plan:
    """Diff the two unit directories against what the manager runs now."""
    old, new = _definitions(old_units), _definitions(new_units)
    removed = sorted(set(old) - set(new))
    added = sorted(set(new) - set(old))
    changed = sorted(name for name in set(old) & set(new) if old[name] != new[name])
    wanted = _wanted_by(new_units)
    targets = {t for name in added for t in wanted.get(name, ())}
    states = _active_states(systemctl, [*removed, *changed, *targets])
    return Plan(
        stop=tuple(n for n in removed if states.get(n) in _RUNNING),
        restart=tuple(n for n in changed if states.get(n) in _RUNNING),
        start=tuple(n for n in added if any(states.get(t) == "active" for t in wanted.get(n, ()))),
    )


def sd_switch(systemctl: Systemctl, log: OpLog, old_units: Path | None, new_units: Path) -> Plan:
    """Stop removed units, reload, restart changed and start new ones; each call waits."""
    steps = plan(systemctl, old_units, new_units)
    calls: list[tuple[str, ...]] = []
    if steps.stop:
        calls.append(("stop", *steps.stop))
    calls.append(("daemon-reload",))
    if steps.restart:
        calls.append(("restart", *steps.restart))
    if steps.start:
        calls.append(("start", *steps.start))
    for args in calls:
        log.add("systemctl", " ".join(args))
        systemctl(*args)
        log.add("systemctl-done", " ".join(args))
    return steps

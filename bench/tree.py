"""Generate N user units laid out the way Home Manager does, plus the hand-written files users add.

Layout per 100 units (deterministic, so runs compare):
- 90 services, 10 timers (each timer triggers the service just before it);
- of the services, 10 are hand-written regular files in ``~/.config/systemd/user`` enabled with
  a plain ``.wants`` link (accepted into the baseline on the daemon's first start), the other 80
  are Home Manager links into the fake store, enabled through HM-managed ``.wants`` links;
- 20 of the Home Manager services carry a managed drop-in ``<unit>.d/10-env.conf``.

Services are wanted by ``default.target`` (so the manager keeps them loaded, as a real HM user's
are) but carry a ``ConditionPathExists=`` that is false: the boot starts no 5,000 processes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from provenanced.sandbox import Sandbox, activate, build_generation

UNITS = ".config/systemd/user"
# The condition file never exists: each start job is skipped without a fork.
_SERVICE = """\
[Unit]
Description=bench service {i}
ConditionPathExists=%h/.bench-never-{i}

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/true

[Install]
WantedBy=default.target
"""
_TIMER = """\
[Unit]
Description=bench timer {i}

[Timer]
OnCalendar=*-01-01 04:{minute:02d}:00
Unit={service}

[Install]
WantedBy=timers.target
"""
_DROPIN = "[Service]\nEnvironment=BENCH_UNIT={i} BENCH_ROLE=managed\n"
_HANDWRITTEN = "# written by hand, not by Home Manager\n"


@dataclass(slots=True)
class Tree:
    """What was generated, and which files each change kind may touch."""

    size: int
    config_dir: Path
    units: list[str] = field(default_factory=list)
    hm_fragments: list[Path] = field(default_factory=list)
    plain_fragments: list[Path] = field(default_factory=list)
    dropin_dirs: list[Path] = field(default_factory=list)
    files: int = 0

    @property
    def services(self) -> list[str]:
        """Service units, the ones the timer baseline and node_exporter also see."""
        return [u for u in self.units if u.endswith(".service")]


def _name(i: int, suffix: str) -> str:
    return f"bench-{i:05d}.{suffix}"


def plan(size: int) -> tuple[dict[str, str], dict[str, str]]:
    """Home Manager files and hand-written files (home-relative path → text) for ``size`` units."""
    managed: dict[str, str] = {}
    plain: dict[str, str] = {}
    for i in range(size):
        slot = i % 100
        if slot % 10 == 9:
            service = _name(i - 1, "service")
            text = _TIMER.format(i=i, minute=i % 60, service=service)
            managed[f"{UNITS}/{_name(i, 'timer')}"] = text
            managed[f"{UNITS}/timers.target.wants/{_name(i, 'timer')}"] = text
            continue
        unit = _name(i, "service")
        text = _SERVICE.format(i=i)
        if slot % 10 == 4:
            plain[f"{UNITS}/{unit}"] = _HANDWRITTEN + text
            continue
        managed[f"{UNITS}/{unit}"] = text
        managed[f"{UNITS}/default.target.wants/{unit}"] = text
        if slot % 5 == 0:
            managed[f"{UNITS}/{unit}.d/10-env.conf"] = _DROPIN.format(i=i)
    return managed, plain


def generate(sandbox: Sandbox, size: int) -> Tree:
    """Build and activate the generation, then write the hand-written units; before boot."""
    managed, plain = plan(size)
    generation = build_generation(sandbox.store, managed, name_hint=f"bench-{size}")
    activate(sandbox.home, generation)
    sandbox.generation = generation
    wants = sandbox.config_dir / "default.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    for rel, text in plain.items():
        path = sandbox.home / rel
        path.write_text(text)
        # What `systemctl --user enable` leaves behind: an absolute link to the unit file.
        (wants / path.name).symlink_to(path)
    tree = Tree(size=size, config_dir=sandbox.config_dir, files=len(managed) + 2 * len(plain))
    for rel in (*managed, *plain):
        path = sandbox.home / rel
        if path.parent != sandbox.config_dir:
            if path.parent.name.endswith(".d"):
                tree.dropin_dirs.append(path.parent)
            continue
        tree.units.append(path.name)
        if rel in plain:
            tree.plain_fragments.append(path)
        elif path.name.endswith(".service"):
            tree.hm_fragments.append(path)
    tree.units.sort()
    for paths in (tree.hm_fragments, tree.plain_fragments, tree.dropin_dirs):
        paths.sort()
    assert all(p.is_symlink() for p in tree.hm_fragments)
    assert not any(os.path.islink(p) for p in tree.plain_fragments)
    return tree

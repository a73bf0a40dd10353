"""A Home Manager activation followed: held while it runs, diffed once at its end, bounded."""

from __future__ import annotations

import os
from pathlib import Path

from provenanced.core.state import AuditState, Reading
from provenanced.daemon.activation import GCROOTS, Activation
from provenanced.model import (
    FileFact,
    FileKind,
    Finding,
    HomeManagerGeneration,
    Observation,
    Tier,
    UnitDir,
    frozen_map,
)


def _reading(home: Path, generation: Path, stray: bool) -> Reading:
    units = str(home / ".config/systemd/user")
    path = f"{units}/stray.service"
    facts = {path: FileFact(path, FileKind.FILE, uid=os.getuid(), mode=0o644, sha256="s")}
    obs = Observation(
        units=frozen_map({}),
        facts=frozen_map(facts if stray else {}),
        unit_dirs=(UnitDir(units, Tier.CONFIG, 0),),
        uid=os.getuid(),
        scanned_files=frozenset(facts if stray else ()),
    )
    gen = HomeManagerGeneration(str(generation), f"{generation}-home-manager-files")
    return Reading(obs, None, gen)


class Home:
    def __init__(self, tmp_path: Path) -> None:
        self.home = tmp_path / "home"
        self.gcroots = self.home / GCROOTS
        self.gcroots.mkdir(parents=True)
        self.old, self.new = tmp_path / "a-gen", tmp_path / "b-gen"
        self.old.mkdir()
        self.new.mkdir()
        (self.gcroots / "current-home").symlink_to(self.old)
        self.state = AuditState(("/nix/store",))
        self.activation = Activation(str(self.home), timeout=60.0)
        self.published: tuple[Finding, ...] = ()

    def update(self, now: float, stray: bool = False) -> list[str]:
        """One re-read and look; returns the sent transitions as ``state:path-name``."""
        generation = Path(os.path.realpath(self.gcroots / "current-home"))
        transitions = self.state.update(_reading(self.home, generation, stray), now)
        roots = self.activation.read_roots()
        verdict = self.activation.look(self.state, self.published, transitions, now, roots)
        self.published = self.activation.published(self.state.findings)
        return [f"{t.state}:{Path(t.finding.path).name}" for t in verdict.transitions]


class TestActivation:
    def test_held_while_new_home_is_ahead_then_sent_once(self, tmp_path: Path) -> None:
        """Drift during the activation is published only at its end, as one transition."""
        h = Home(tmp_path)
        assert h.update(0.0) == []
        (h.gcroots / "new-home").symlink_to(h.new)
        assert h.update(1.0, stray=True) == []
        assert h.activation.holding and h.published == ()
        assert h.update(2.0, stray=True) == []
        (h.gcroots / "current-home").unlink()
        (h.gcroots / "current-home").symlink_to(h.new)
        (h.gcroots / "new-home").unlink()
        assert h.update(3.0, stray=True) == ["detected:stray.service"]
        assert not h.activation.holding
        assert [f.path.rpartition("/")[2] for f in h.published] == ["stray.service"]

    def test_drift_that_came_and_went_during_it_is_never_sent(self, tmp_path: Path) -> None:
        """A finding opened and closed within the activation leaves no transition."""
        h = Home(tmp_path)
        h.update(0.0)
        (h.gcroots / "new-home").symlink_to(h.new)
        assert h.update(1.0, stray=True) == []
        (h.gcroots / "new-home").unlink()
        assert h.update(2.0) == []

    def test_a_stuck_activation_is_judged_after_the_bound(self, tmp_path: Path) -> None:
        """Past the timeout the findings are sent and the activation is flagged stuck."""
        h = Home(tmp_path)
        h.update(0.0)
        (h.gcroots / "new-home").symlink_to(h.new)
        assert h.update(1.0, stray=True) == []
        assert h.update(70.0, stray=True) == ["detected:stray.service"]
        assert h.activation.stuck and not h.activation.holding
        assert h.activation.reason is not None
        (h.gcroots / "new-home").unlink()
        assert h.update(71.0, stray=True) == []
        assert not h.activation.stuck

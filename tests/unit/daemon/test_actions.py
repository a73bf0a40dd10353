"""Heal never loses a byte: quarantine first, refuse on doubt; reload budget and deferral."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from provenanced.config import PolicySettings
from provenanced.daemon.actions import ReloadGate
from provenanced.daemon.heal import Healer
from provenanced.fs.facts import FactReader
from provenanced.model import ExpectedLink, Finding, FindingKind, Tier, UnitDir


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, Path]:
    home = tmp_path / "home"
    units = home / ".config/systemd/user"
    units.mkdir(parents=True)
    store = tmp_path / "nix/store"
    store.mkdir(parents=True)
    target = store / "aaaa-web.service"
    target.write_text("[Service]\nExecStart=/bin/true\n")
    return {"home": home, "units": units, "target": target, "state": tmp_path / "state"}


def finding(path: Path, kind: FindingKind = FindingKind.LINK_REPLACED) -> Finding:
    return Finding(kind, "web.service", str(path), "critical", "divergent: test")


def dirs(tree: dict[str, Path]) -> tuple[UnitDir, ...]:
    return (UnitDir(str(tree["units"]), Tier.CONFIG, 0),)


def expected(path: Path, target: Path) -> ExpectedLink:
    return ExpectedLink(str(path), str(target), str(target), None)


class TestHealer:
    def test_quarantines_byte_identical_then_links(self, tree: dict[str, Path]) -> None:
        """The replaced file lands in quarantine unchanged with a sidecar; the link is back."""
        path = tree["units"] / "web.service"
        payload = b"[Service]\nExecStart=/bin/false\n\x00binary\xff"
        path.write_bytes(payload)
        path.chmod(0o640)
        healer = Healer(str(tree["state"]), str(tree["home"]))
        outcome = healer.heal(
            finding(path), FactReader().read(str(path)), expected(path, tree["target"]), dirs(tree)
        )
        assert outcome.ok, outcome.detail
        assert os.readlink(path) == str(tree["target"])
        assert outcome.quarantined is not None
        assert Path(outcome.quarantined).read_bytes() == payload
        assert outcome.quarantined.endswith(".config/systemd/user/web.service")
        meta = json.loads(Path(outcome.quarantined + ".provenanced.json").read_text())
        assert meta["original_path"] == str(path) and meta["mode"] == "0o640" and meta["sha256"]

    def test_aborts_untouched_when_file_changed(self, tree: dict[str, Path]) -> None:
        """A file rewritten between examination and heal is left exactly as it is now."""
        path = tree["units"] / "web.service"
        path.write_text("first")
        examined = FactReader().read(str(path))
        path.write_text("second, written by someone else")
        outcome = Healer(str(tree["state"]), str(tree["home"])).heal(
            finding(path), examined, expected(path, tree["target"]), dirs(tree)
        )
        assert not outcome.ok and "changed since" in outcome.detail
        assert path.read_text() == "second, written by someone else"
        assert not (tree["state"] / "quarantine").exists()

    def test_refuses_symlinked_parent(self, tree: dict[str, Path], tmp_path: Path) -> None:
        """A unit directory reached through a symlink is never written through."""
        real = tmp_path / "elsewhere"
        real.mkdir()
        (real / "web.service").write_text("x")
        linked = tree["units"] / "web.service.d"
        linked.symlink_to(real)
        path = linked / "web.service"
        examined = FactReader().read(str(path))
        outcome = Healer(str(tree["state"]), str(tree["home"])).heal(
            finding(path),
            examined,
            expected(path, tree["target"]),
            (UnitDir(str(linked), Tier.CONFIG, 0),),
        )
        assert not outcome.ok and "symlink" in outcome.detail
        assert (real / "web.service").read_text() == "x"

    def test_refuses_outside_unit_dirs(self, tree: dict[str, Path], tmp_path: Path) -> None:
        """Paths outside the user unit directories are never healed."""
        path = tmp_path / "web.service"
        path.write_text("x")
        outcome = Healer(str(tree["state"]), str(tree["home"])).heal(
            finding(path), FactReader().read(str(path)), expected(path, tree["target"]), dirs(tree)
        )
        assert not outcome.ok and "not inside a user unit directory" in outcome.detail
        assert path.read_text() == "x"

    def test_refuses_without_expected_target(self, tree: dict[str, Path]) -> None:
        """Only links the current generation places can be healed; a missing target aborts."""
        path = tree["units"] / "web.service"
        path.write_text("x")
        fact = FactReader().read(str(path))
        healer = Healer(str(tree["state"]), str(tree["home"]))
        assert not healer.heal(finding(path), fact, None, dirs(tree)).ok
        gone = ExpectedLink(str(path), str(tree["target"]) + ".gone", None, None)
        assert "does not exist" in healer.heal(finding(path), fact, gone, dirs(tree)).detail
        assert path.read_text() == "x"

    def test_managed_missing_places_link(self, tree: dict[str, Path]) -> None:
        """A missing managed link is simply placed; nothing needs quarantine."""
        path = tree["units"] / "web.service"
        outcome = Healer(str(tree["state"]), str(tree["home"])).heal(
            finding(path, FindingKind.MANAGED_MISSING),
            FactReader().read(str(path)),
            expected(path, tree["target"]),
            dirs(tree),
        )
        assert outcome.ok and outcome.quarantined is None
        assert os.readlink(path) == str(tree["target"])

    def test_defers_while_a_writer_holds_the_file(self, tree: dict[str, Path]) -> None:
        """A file someone has open for writing is left alone and tried again later, not dropped."""
        path = tree["units"] / "web.service"
        path.write_text("[Service]\n")
        examined = FactReader().read(str(path))
        healer = Healer(str(tree["state"]), str(tree["home"]))
        writer = os.open(path, os.O_WRONLY | os.O_APPEND)
        try:
            held = healer.heal(finding(path), examined, expected(path, tree["target"]), dirs(tree))
        finally:
            os.close(writer)
        assert not held.ok and held.retry_in is not None and "open for writing" in held.detail
        assert path.read_text() == "[Service]\n" and not (tree["state"] / "quarantine").exists()
        closed = healer.heal(finding(path), examined, expected(path, tree["target"]), dirs(tree))
        assert closed.ok and closed.retry_in is None, closed.detail

    def test_defers_within_the_quiet_window(self, tree: dict[str, Path]) -> None:
        """A file changed less than the quiet window ago waits out the rest of the window."""
        path = tree["units"] / "web.service"
        path.write_text("[Service]\n")
        outcome = Healer(str(tree["state"]), str(tree["home"])).heal(
            finding(path),
            FactReader().read(str(path)),
            expected(path, tree["target"]),
            dirs(tree),
            quiet_window=60.0,
        )
        assert not outcome.ok and outcome.retry_in is not None and 0 < outcome.retry_in <= 60
        assert "waiting for 60s without changes" in outcome.detail
        assert path.read_text() == "[Service]\n" and not (tree["state"] / "quarantine").exists()

    def test_sidecar_records_the_hash_of_the_quarantined_bytes(self, tree: dict[str, Path]) -> None:
        """The sidecar's sha256 is the hash of exactly the file in quarantine."""
        path = tree["units"] / "web.service"
        path.write_bytes(b"[Service]\nExecStart=/bin/false\n")
        outcome = Healer(str(tree["state"]), str(tree["home"])).heal(
            finding(path), FactReader().read(str(path)), expected(path, tree["target"]), dirs(tree)
        )
        assert outcome.ok and outcome.quarantined is not None, outcome.detail
        meta = json.loads(Path(outcome.quarantined + ".provenanced.json").read_text())
        assert meta["sha256"] == hashlib.sha256(Path(outcome.quarantined).read_bytes()).hexdigest()

    @pytest.mark.parametrize(
        ("kind", "mode", "wanted"),
        [
            (FindingKind.LINK_REPLACED, "heal", True),
            (FindingKind.LINK_REPLACED, "flag", False),
            (FindingKind.UNMANAGED_UNIT, "heal", False),
        ],
    )
    def test_wants_only_opted_in_link_kinds(
        self, kind: FindingKind, mode: str, wanted: bool
    ) -> None:
        """Healing is opt-in per kind and limited to the link kinds."""
        policy = PolicySettings.model_construct(heal={kind: mode})
        assert Healer.wants(finding(Path("/x"), kind), policy) is wanted


class TestReloadGate:
    def test_hourly_budget(self) -> None:
        """At most max_reloads_per_hour reloads in any hour."""
        gate = ReloadGate(PolicySettings(max_reloads_per_hour=2))
        gate.record(0)
        gate.record(10)
        assert not gate.within_budget(100)
        assert gate.within_budget(3601)

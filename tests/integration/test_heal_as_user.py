"""Heal and quarantine run on the user's thread: what they create is the user's, nothing more."""

from __future__ import annotations

import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from provenanced.daemon.heal import Healer
from provenanced.fs.fsuid import Credentials, UserThread
from provenanced.model import Finding, FindingKind, Tier, UnitDir
from provenanced.sandbox import HostSandbox, UserSandbox

pytestmark = [pytest.mark.integration, pytest.mark.host]

UNIT = "podman-web.service"
EDITED = "[Service]\nExecStart=/bin/sleep 60\n"


@pytest.fixture
def user(host_sandbox: HostSandbox) -> UserSandbox:
    """A fresh user per test whose managed link was replaced by an edited copy (as the user)."""
    user = host_sandbox.add_user(boot=False)
    path = user.config_dir / UNIT
    path.unlink()
    path.write_text(EDITED)
    os.chown(path, user.account.uid, user.account.gid)
    return user


@pytest.fixture
async def helper(user: UserSandbox) -> AsyncIterator[UserThread]:
    """The thread acting as the user."""
    started = await UserThread.start(Credentials.of_uid(user.account.uid))
    try:
        yield started
    finally:
        started.close()


async def _heal(user: UserSandbox, helper: UserThread, state_dir: Path) -> tuple[str, bool, str]:
    """Heal the replaced link the way the daemon will: facts and expectations read as the user."""
    path = str(user.config_dir / UNIT)
    dirs = (UnitDir(str(user.config_dir), Tier.CONFIG, 0),)
    generation = await helper.generation(str(user.home), dirs)
    examined = (await helper.facts([path]))[path]
    finding = Finding(FindingKind.LINK_REPLACED, UNIT, path, "critical", "divergent")
    healer = Healer(str(state_dir), str(user.home))
    outcome = await helper.run(healer.heal, finding, examined, generation.links[path], dirs)
    return generation.links[path].target, outcome.ok, outcome.detail


def _owners(top: Path) -> set[int]:
    return {
        os.lstat(os.path.join(d, n)).st_uid
        for d, dirs, files in os.walk(top)
        for n in (*dirs, *files)
    } | {top.lstat().st_uid}


class TestHealAsUser:
    """Healer.heal, run on the thread holding the user's filesystem uid and gids."""

    async def test_everything_it_creates_belongs_to_the_user(
        self, user: UserSandbox, helper: UserThread
    ) -> None:
        """The new link, the quarantine tree, the moved file and its sidecar are the user's."""
        state_dir = user.home / ".local/state/provenanced"
        target, ok, detail = await _heal(user, helper, state_dir)
        assert ok, detail
        path = user.config_dir / UNIT
        assert os.readlink(path) == target
        assert path.lstat().st_uid == user.account.uid
        quarantine = state_dir / "quarantine"
        (moved,) = quarantine.glob(f"*/.config/systemd/user/{UNIT}")
        assert moved.read_text() == EDITED
        assert _owners(state_dir) == {user.account.uid}
        assert stat.S_IMODE(quarantine.stat().st_mode) == 0o700

    async def test_a_planted_link_redirects_nothing(
        self, host_sandbox: HostSandbox, user: UserSandbox, helper: UserThread
    ) -> None:
        """Quarantine linked by the user into a root-owned dir: the move is refused, the file stays."""
        elsewhere = host_sandbox.root / f"root-owned-{user.account.name}"
        elsewhere.mkdir(mode=0o755)
        state_dir = user.home / ".local/state/provenanced"
        state_dir.mkdir(parents=True)
        (state_dir / "quarantine").symlink_to(elsewhere)
        for path in (state_dir, state_dir / "quarantine"):
            os.chown(path, user.account.uid, user.account.gid, follow_symlinks=False)
        _target, ok, detail = await _heal(user, helper, state_dir)
        assert not ok
        assert "Permission denied" in detail
        assert list(elsewhere.iterdir()) == []
        path = user.config_dir / UNIT
        assert not path.is_symlink() and path.read_text() == EDITED

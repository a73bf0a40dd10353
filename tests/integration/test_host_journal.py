"""What journald lets a user find of entries root sends about that user's units.

Host mode sends every entry as root (_UID=0). ``journalctl --user-unit U`` matches, among
others, ``USER_UNIT=U`` only with ``_UID=<caller>``, and ``OBJECT_SYSTEMD_USER_UNIT=U`` with
``_UID=<caller>`` or ``_UID=0`` (systemd src/shared/logs-show.c, add_matches_for_user_unit).
These tests pin down, against the real journald, which fields make root's entries findable.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
from systemd import journal

from helpers import wait_until
from provenanced.sandbox import Account, HostSandbox, Journald

pytestmark = [pytest.mark.integration, pytest.mark.host]

JOURNAL_DIRS = (Path("/run/log/journal"), Path("/var/log/journal"))


def _journalctl(*args: str, account: Account | None = None) -> list[dict[str, str]]:
    """Entries as journalctl prints them in JSON, run as root or as ``account``."""
    run_as = {}
    if account is not None:
        run_as = {"user": account.uid, "group": account.gid, "extra_groups": list(account.groups)}
    out = subprocess.run(
        ["journalctl", "--no-pager", "-o", "json", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
        cwd="/",
        **run_as,  # type: ignore[arg-type]  # subprocess keywords
    ).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def _markers(entries: list[dict[str, str]]) -> set[str]:
    return {e["PROVENANCED_TEST"] for e in entries if "PROVENANCED_TEST" in e}


@pytest.fixture(scope="module")
def sent(journald: Journald | None, host_sandbox: HostSandbox) -> dict[str, object]:
    """Two root entries about one user's unit: with OBJECT_ fields, and with USER_UNIT only.

    journald keeps its files root-only, so the users get a readable copy of them.
    """
    owner = host_sandbox.add_user(boot=False)
    other = host_sandbox.add_user(boot=False)
    unit = f"probe-{uuid.uuid4().hex[:12]}.service"
    with_object, user_unit_only = uuid.uuid4().hex, uuid.uuid4().hex
    journal.send(
        "host-mode style entry",
        USER_UNIT=unit,
        OBJECT_SYSTEMD_USER_UNIT=unit,
        OBJECT_UID=str(owner.account.uid),
        PROVENANCED_USER=owner.account.name,
        PROVENANCED_TEST=with_object,
    )
    journal.send("user-mode style entry", USER_UNIT=unit, PROVENANCED_TEST=user_unit_only)
    wait_until(
        lambda: _markers(_journalctl(f"USER_UNIT={unit}")) == {with_object, user_unit_only},
        message="both entries in the journal",
    )
    copy = host_sandbox.root / "journal-copy"
    copy.mkdir(mode=0o755)
    for source in JOURNAL_DIRS:
        for path in source.glob("*/*.journal"):
            target = copy / f"{path.parent.name}-{path.name}"
            shutil.copyfile(path, target)
            target.chmod(0o644)
    return {
        "owner": owner.account,
        "other": other.account,
        "unit": unit,
        "with_object": with_object,
        "user_unit_only": user_unit_only,
        "copy": str(copy),
    }


class TestUserUnitMatch:
    """Which of root's entries `journalctl --user-unit` shows, and to whom."""

    def test_the_owner_finds_the_entry_with_object_fields_only(
        self, sent: dict[str, object]
    ) -> None:
        """OBJECT_SYSTEMD_USER_UNIT from uid 0 matches; USER_UNIT from uid 0 does not."""
        owner = sent["owner"]
        assert isinstance(owner, Account)
        seen = _journalctl(
            "--directory", str(sent["copy"]), "--user-unit", str(sent["unit"]), account=owner
        )
        assert _markers(seen) == {sent["with_object"]}

    def test_any_user_finds_it_unless_they_add_object_uid(self, sent: dict[str, object]) -> None:
        """The match ignores whose unit it was: another user sees it until OBJECT_UID narrows it."""
        other, owner = sent["other"], sent["owner"]
        assert isinstance(other, Account) and isinstance(owner, Account)
        args = ("--directory", str(sent["copy"]), "--user-unit", str(sent["unit"]))
        assert _markers(_journalctl(*args, account=other)) == {sent["with_object"]}
        assert _journalctl(*args, f"OBJECT_UID={other.uid}", account=other) == []
        assert _markers(_journalctl(*args, f"OBJECT_UID={owner.uid}", account=owner)) == {
            sent["with_object"]
        }

    def test_root_finds_both_and_narrows_by_user(self, sent: dict[str, object]) -> None:
        """Root's own --user-unit shows both (USER_UNIT with _UID=0); PROVENANCED_USER narrows."""
        owner = sent["owner"]
        assert isinstance(owner, Account)
        unit = str(sent["unit"])
        both = {sent["with_object"], sent["user_unit_only"]}
        assert _markers(_journalctl("--user-unit", unit)) == both
        narrowed = _journalctl(f"PROVENANCED_USER={owner.name}", f"USER_UNIT={unit}")
        assert _markers(narrowed) == {sent["with_object"]}

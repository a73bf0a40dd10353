"""The journald entries the sink composes: IDs, priorities and fields, without a journald."""

from __future__ import annotations

import pytest

from provenanced.model import SEVERITIES, Finding, FindingKind, Severity, Transition
from provenanced.sinks import journal
from provenanced.sinks.journal import (
    connection_lost_entry,
    heal_entry,
    job_unverified_entry,
    reload_entry,
    transition_entry,
)

# DESIGN §5: fixed forever.
DESIGN_IDS = {
    "DRIFT_DETECTED": "602394dfbeaf4f2796fcbdeea0b459bf",
    "DRIFT_RESOLVED": "c6977927e6464702ae1d8e2ade0a959d",
    "RELOAD_DONE": "cf85ee367c544dee94d1a3aa33c960ff",
    "RELOAD_FAILED": "6153be55706e4a3cac3a71b05c65605b",
    "HEAL_DONE": "3d3d5a40837b4276a98606ac445c2d47",
    "HEAL_FAILED": "b67c8abdd2454fe8a4d2e88be2a143f0",
    "JOB_UNVERIFIED": "0b9945bf71634ea286075da53bc2d499",
    "CONNECTION_LOST": "b5b3468fbee347e6af9e7756e7db3884",
}


def _finding(
    kind: FindingKind = FindingKind.LINK_REPLACED, severity: Severity = "warning"
) -> Finding:
    return Finding(
        kind, "web.service", "/home/u/.config/systemd/user/web.service", severity, "latent"
    )


class TestMessageIds:
    @pytest.mark.parametrize(("name", "value"), DESIGN_IDS.items())
    def test_ids_match_the_design(self, name: str, value: str) -> None:
        """Each MESSAGE_ID constant is exactly the one DESIGN §5 fixes."""
        assert getattr(journal, name) == value


class TestTransitionEntry:
    @pytest.mark.parametrize("kind", list(FindingKind))
    @pytest.mark.parametrize("severity", SEVERITIES)
    def test_detected(self, kind: FindingKind, severity: Severity) -> None:
        """A detected finding carries its fields and a priority from its severity."""
        entry = transition_entry(Transition(_finding(kind, severity), "detected"))
        assert entry["MESSAGE_ID"] == journal.DRIFT_DETECTED
        assert entry["PRIORITY"] == {"critical": "2", "warning": "4", "info": "6"}[severity]
        assert entry["SYSLOG_IDENTIFIER"] == "provenanced"
        assert entry["USER_UNIT"] == "web.service"
        assert entry["PROVENANCED_KIND"] == kind.value
        assert entry["PROVENANCED_PATH"] == "/home/u/.config/systemd/user/web.service"
        assert entry["PROVENANCED_DETAIL"] == "latent"
        assert entry["PROVENANCED_SEVERITY"] == severity
        assert kind.value in entry["MESSAGE"]
        assert "web.service" in entry["MESSAGE"]

    @pytest.mark.parametrize("severity", SEVERITIES)
    def test_resolved_is_notice(self, severity: Severity) -> None:
        """A resolved finding is logged at notice (5) whatever its severity was."""
        entry = transition_entry(Transition(_finding(severity=severity), "resolved"))
        assert entry["MESSAGE_ID"] == journal.DRIFT_RESOLVED
        assert entry["PRIORITY"] == "5"
        assert entry["USER_UNIT"] == "web.service"

    def test_field_names_are_valid_journal_names(self) -> None:
        """Every field name is uppercase letters, digits and underscores, not leading _."""
        entry = transition_entry(Transition(_finding(), "detected"))
        for name in entry:
            assert name == name.upper()
            assert not name.startswith("_")
            assert name.replace("_", "").isalnum()

    def test_message_escapes_control_characters_but_fields_keep_them(self) -> None:
        """MESSAGE stays one line; the structured field keeps the path byte for byte."""
        path = "/x\nPRIORITY=0\nUSER_UNIT=evil.service\x1b[31m"
        finding = Finding(FindingKind.UNSAFE_MODE, "web.service", path, "warning", "mode 0666")
        entry = transition_entry(Transition(finding, "detected"))
        assert "\n" not in entry["MESSAGE"]
        assert "\x1b" not in entry["MESSAGE"]
        assert "\\nPRIORITY=0" in entry["MESSAGE"]
        assert entry["PROVENANCED_PATH"] == path
        assert entry["PRIORITY"] == "4"


class TestOtherEntries:
    @pytest.mark.parametrize(
        ("ok", "message_id", "priority"),
        [(True, journal.RELOAD_DONE, "6"), (False, journal.RELOAD_FAILED, "3")],
    )
    def test_reload(self, ok: bool, message_id: str, priority: str) -> None:
        """A reload is info when done and err when it failed, with trigger and detail."""
        entry = reload_entry(ok, "stale-load", "Access denied")
        assert entry["MESSAGE_ID"] == message_id
        assert entry["PRIORITY"] == priority
        assert entry["PROVENANCED_TRIGGER"] == "stale-load"
        assert entry["PROVENANCED_DETAIL"] == "Access denied"
        assert "USER_UNIT" not in entry

    @pytest.mark.parametrize(
        ("ok", "message_id", "priority"),
        [(True, journal.HEAL_DONE, "5"), (False, journal.HEAL_FAILED, "3")],
    )
    def test_heal(self, ok: bool, message_id: str, priority: str) -> None:
        """A heal is notice when done and err when it failed, naming the unit and path."""
        entry = heal_entry(ok, _finding(), "restored link")
        assert entry["MESSAGE_ID"] == message_id
        assert entry["PRIORITY"] == priority
        assert entry["USER_UNIT"] == "web.service"
        assert entry["PROVENANCED_DETAIL"] == "restored link"

    @pytest.mark.parametrize("severity", SEVERITIES)
    def test_job_unverified(self, severity: Severity) -> None:
        """An unverified job is reported with the finding's severity as priority."""
        entry = job_unverified_entry(_finding(FindingKind.JOB_UNVERIFIED, severity))
        assert entry["MESSAGE_ID"] == journal.JOB_UNVERIFIED
        assert entry["PRIORITY"] == str(journal.PRIORITY_BY_SEVERITY[severity])
        assert entry["PROVENANCED_KIND"] == "job-unverified"

    def test_connection_lost(self) -> None:
        """A lost connection is err and names the address and the error."""
        entry = connection_lost_entry("unix:path=/run/user/1000/bus", "EOF")
        assert entry["MESSAGE_ID"] == journal.CONNECTION_LOST
        assert entry["PRIORITY"] == "3"
        assert entry["PROVENANCED_ADDRESS"] == "unix:path=/run/user/1000/bus"
        assert entry["PROVENANCED_DETAIL"] == "EOF"


class TestHostModeFields:
    """Host mode adds the user, and the fields that let their journalctl --user-unit find it."""

    def test_finding_entries_name_the_user_and_the_user_unit(self) -> None:
        """PROVENANCED_USER, OBJECT_UID and OBJECT_SYSTEMD_USER_UNIT beside USER_UNIT."""
        finding = Finding(FindingKind.MASKED, "a.service", "/home/u/a.service", "warning", "")
        entry = journal.transition_entry(Transition(finding, "detected"))
        fields = journal.user_fields(entry, "alice", 1001)
        assert fields == {
            "PROVENANCED_USER": "alice",
            "OBJECT_UID": "1001",
            "OBJECT_SYSTEMD_USER_UNIT": "a.service",
        }

    def test_entries_about_no_unit_name_only_the_user(self) -> None:
        """A lost connection concerns no unit: no OBJECT_SYSTEMD_USER_UNIT."""
        entry = journal.connection_lost_entry("unix:path=/run/user/1001/systemd/private", "gone")
        assert journal.user_fields(entry, "alice", 1001) == {
            "PROVENANCED_USER": "alice",
            "OBJECT_UID": "1001",
        }

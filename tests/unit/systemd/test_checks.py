"""Each job's start checks as the manager announced them: before the job runs, and after."""

from __future__ import annotations

from provenanced.model import UNTESTED, JobChecks, StartChecks
from provenanced.systemd import events
from provenanced.systemd.checks import ChecksSeen
from provenanced.systemd.names import unit_object_path

UNIT = "report.service"
UNIT_PATH = unit_object_path(UNIT)
JOB = "/org/freedesktop/systemd1/job/7"
UNIT_IFACE = "org.freedesktop.systemd1.Unit"
REMOVED = events.JobRemoved(7, JOB, UNIT, "done")


def changed(checks: StartChecks, job: str | None = JOB) -> events.PropertiesChanged:
    """The unit's PropertiesChanged as the manager sends it, naming its job (or none)."""
    return events.PropertiesChanged(
        UNIT_PATH,
        UNIT_IFACE,
        {
            "Job": (7, job) if job else (0, "/"),
            "ConditionResult": checks.condition_result,
            "ConditionTimestampMonotonic": checks.condition_timestamp,
            "AssertResult": checks.assert_result,
            "AssertTimestampMonotonic": checks.assert_timestamp,
            "ActiveState": "inactive",
        },
    )


def play(seen: ChecksSeen, *signals: events.ManagerEvent) -> JobChecks | None:
    """Feed signals, then the job's JobRemoved; what it hands out for the job."""
    for signal in signals:
        assert seen.observe(signal) is None
    return seen.observe(REMOVED)


class TestChecksSeen:
    def test_first_and_last_change_while_the_job_is_queued(self) -> None:
        """The change announcing the job is the before side, the flush before JobRemoved after."""
        old, new = StartChecks(True, 10, True, 11), StartChecks(False, 90, True, 11)
        seen = ChecksSeen()
        around = play(seen, changed(old), events.JobNew(7, JOB, UNIT), changed(new))
        assert around == JobChecks(old, new)
        assert seen.observe(REMOVED) is None

    def test_a_unit_loaded_for_its_job_starts_untested(self) -> None:
        """UnitNew outside a reload: the first change seen already follows the test."""
        new = StartChecks(False, 90, False, 0)
        around = play(ChecksSeen(), events.UnitNew(UNIT, UNIT_PATH), changed(new))
        assert around == JobChecks(UNTESTED, new)

    def test_a_reload_recreates_units_with_their_state(self) -> None:
        """UnitNew during daemon-reload is no fresh load: the unit keeps its old tests."""
        old = StartChecks(False, 50, False, 0)
        reload = (events.Reloading(True), events.UnitNew(UNIT, UNIT_PATH), events.Reloading(False))
        assert play(ChecksSeen(), *reload, changed(old)) == JobChecks(old, old)

    def test_a_unit_first_announced_as_its_job_ends_is_no_longer_fresh(self) -> None:
        """A late UnitNew (after the job's test) is spent by that job's JobRemoved: the next
        job's before side is its own announcing change, not "untested"."""
        failed = StartChecks(False, 90, False, 0)
        seen = ChecksSeen()
        seen.observe(events.UnitNew(UNIT, UNIT_PATH))
        seen.observe(events.JobRemoved(6, "/org/freedesktop/systemd1/job/6", UNIT, "done"))
        assert play(seen, changed(failed)) == JobChecks(failed, failed)

    def test_changes_without_a_job_or_of_other_interfaces_are_ignored(self) -> None:
        """Only a Unit-interface change that names a job is recorded."""
        service = events.PropertiesChanged(
            UNIT_PATH, "org.freedesktop.systemd1.Service", changed(UNTESTED).changed
        )
        assert play(ChecksSeen(), changed(UNTESTED, job=None), service) is None

"""The judgement after a job ended: why a unit did not verify, and the findings it opens."""

from __future__ import annotations

from dataclasses import replace

import pytest

from provenanced.core.jobs import JobFindings, failed_check, read_back, unverified_reason
from provenanced.model import UNTESTED, JobChecks, ServiceResult, StartChecks

RAN = ServiceResult("inv-2", "success", 1, 0, True, True, "active", "running")


def ran(**changes: object) -> ServiceResult:
    return replace(RAN, **changes)  # type: ignore[arg-type]


class TestUnverifiedReason:
    @pytest.mark.parametrize(
        ("result", "job_result", "fragment"),
        [
            (ran(condition_result=False), "done", "ConditionResult=no"),
            (ran(assert_result=False), "done", "AssertResult=no"),
            (ran(exec_main_status=3, result="exit-code"), "done", "exited with status 3"),
            (ran(result="timeout"), "done", "Result is 'timeout'"),
            (ran(active_state="failed", result="success"), "done", "failed state"),
            (RAN, "canceled", "the job ended 'canceled'"),
        ],
    )
    def test_each_failure_names_its_evidence(
        self, result: ServiceResult, job_result: str, fragment: str
    ) -> None:
        """The reason says which property showed the unit did not run or failed."""
        reason = unverified_reason(result, job_result)
        assert reason is not None and fragment in reason

    def test_a_clean_run_verifies(self) -> None:
        """Success, conditions met, main process 0: nothing to say."""
        assert unverified_reason(RAN, "done", before_invocation="inv-1") is None

    def test_an_unchanged_invocation_means_nothing_ran(self) -> None:
        """A restart that kept the InvocationID did not start a new run."""
        reason = unverified_reason(RAN, "done", before_invocation="inv-2")
        assert reason is not None and "InvocationID" in reason


class TestJobFindings:
    def test_opens_once_and_reports_only_the_opening(self) -> None:
        """The second failure of the same unit updates the finding but is not new."""
        jobs = JobFindings()
        first = jobs.record("a.service", 1, "done", ran(condition_result=False))
        second = jobs.record("a.service", 2, "done", ran(condition_result=False))
        assert first is not None and second is None
        assert [f.detail for f in jobs.findings()] == [
            "job 2 ended 'done' but a start condition failed (ConditionResult=no): the unit did not run"
        ]

    def test_a_verified_job_closes_it(self) -> None:
        """A clean run of the unit closes its finding."""
        jobs = JobFindings()
        jobs.record("a.service", 1, "done", ran(condition_result=False))
        assert jobs.record("a.service", 2, "done", RAN) is None
        assert jobs.findings() == []

    def test_a_clean_stop_closes_it(self) -> None:
        """A stop job leaves the unit inactive with success: nothing claimed to run and fail."""
        jobs = JobFindings()
        jobs.record("a.service", 1, "done", ran(condition_result=False))
        jobs.record("a.service", 2, "done", ran(active_state="inactive", exec_main_code=0))
        assert jobs.findings() == []

    def test_a_unit_without_invocation_id_is_unknown_not_failed(self) -> None:
        """A garbage-collected unit read back blank opens nothing."""
        jobs = JobFindings()
        assert jobs.record("a.service", 1, "done", ran(invocation_id="", result="failed")) is None
        assert jobs.findings() == []


NEVER_RAN = ServiceResult("", "success", 0, 0, False, False, "inactive", "dead")
CONDITION_FAILED_AT_90 = StartChecks(False, 90, False, 0)


class TestStartChecksThatMoved:
    """The evidence of a job's own Condition/Assert tests: a timestamp that moved and says no."""

    def test_never_run_unit_whose_condition_failed_during_the_job(self) -> None:
        """No InvocationID, but the condition timestamp moved and says no: job-unverified."""
        jobs = JobFindings()
        failed = replace(NEVER_RAN, condition_timestamp=90)
        finding = jobs.record("a.service", 7, "done", failed, JobChecks(UNTESTED, UNTESTED))
        assert finding is not None and "ConditionResult=no" in finding.detail

    def test_unloaded_after_its_failed_condition(self) -> None:
        """The read is blank (garbage-collected); the change flushed before JobRemoved tells."""
        seen = JobChecks(UNTESTED, CONDITION_FAILED_AT_90)
        assert JobFindings().record("a.service", 7, "done", NEVER_RAN, seen) is not None

    def test_unloaded_after_a_clean_run_opens_nothing(self) -> None:
        """A blank read (ConditionResult=no by default, timestamps 0) is no evidence of failure."""
        jobs = JobFindings()
        seen = JobChecks(UNTESTED, StartChecks(True, 90, True, 91))
        assert jobs.record("a.service", 7, "done", NEVER_RAN, seen) is None
        assert jobs.record("a.service", 7, "done", NEVER_RAN, None) is None
        assert jobs.findings() == []

    def test_an_earlier_failure_is_not_this_jobs(self) -> None:
        """A stop job tests nothing: a stale ConditionResult=no neither opens nor closes."""
        stale = replace(
            RAN, condition_result=False, condition_timestamp=50, active_state="inactive"
        )
        untouched = JobChecks(stale.checks, stale.checks)
        assert JobFindings().record("a.service", 8, "done", stale, untouched) is None
        jobs = JobFindings()
        opened = jobs.record("a.service", 7, "done", stale, JobChecks(RAN.checks, stale.checks))
        assert opened is not None
        assert jobs.record("a.service", 8, "done", stale, untouched) is None
        assert jobs.findings() == [opened]

    def test_a_failed_assert_ends_the_job_assert_and_says_why(self) -> None:
        """An assert tested during the job and failed: the reason names the assert."""
        checks = JobChecks(UNTESTED, StartChecks(True, 90, False, 91))
        assert unverified_reason(NEVER_RAN, "assert", None, checks) == (
            "the job ended 'assert': a start assertion failed (AssertResult=no)"
        )

    def test_a_newer_read_wins_over_the_signals(self) -> None:
        """The read is the after side when it is newer than the last change seen."""
        checks = read_back(JobChecks(UNTESTED, UNTESTED), CONDITION_FAILED_AT_90)
        assert failed_check(checks) is not None
        assert read_back(JobChecks(UNTESTED, CONDITION_FAILED_AT_90), UNTESTED) == checks

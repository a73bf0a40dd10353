"""The judgement after a job ended: why a unit did not verify, and the findings it opens."""

from __future__ import annotations

from dataclasses import replace

import pytest

from provenanced.core.jobs import JobFindings, unverified_reason
from provenanced.model import ServiceResult

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

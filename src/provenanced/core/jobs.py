"""Did a job really do what it said? The judgement after a job ends, and the findings it opens."""

from __future__ import annotations

from provenanced.model import Finding, FindingKind, JobChecks, ServiceResult, StartChecks

_CLD_EXITED = 1
_CONDITION_FAILED = "a start condition failed (ConditionResult=no): the unit did not run"
_ASSERT_FAILED = "a start assertion failed (AssertResult=no)"


def failed_check(checks: JobChecks) -> str | None:
    """Why a Condition or Assert tested during the job said no; None when none did."""
    # A failed test never gets an InvocationID: its trace is a timestamp that moved. A unit
    # unloaded and read back blank has 0 there, so it never counts as moved.
    after, before = checks.after, checks.before
    if not after.condition_result and after.condition_timestamp > before.condition_timestamp:
        return _CONDITION_FAILED
    if not after.assert_result and after.assert_timestamp > before.assert_timestamp:
        return _ASSERT_FAILED
    return None


def read_back(checks: JobChecks, read: StartChecks) -> JobChecks:
    """``checks`` with ``read`` as the after side when it is the newer reading."""
    newest = max(checks.after, read, key=lambda c: (c.condition_timestamp, c.assert_timestamp))
    return JobChecks(checks.before, newest)


def unverified_reason(
    result: ServiceResult,
    job_result: str,
    before_invocation: str | None = None,
    checks: JobChecks | None = None,
) -> str | None:
    """Why the unit did not verify after its job, or None when it did.

    ``checks``: the start checks from before the job and after it. Without them a
    ConditionResult=no or AssertResult=no is taken at face value.
    """
    reason = _unit_reason(result, checks)
    if job_result != "done":
        return f"the job ended '{job_result}'" + (f": {reason}" if reason else "")
    if (
        reason is None
        and before_invocation is not None
        and result.invocation_id == before_invocation
    ):
        return "the unit did not run (its InvocationID did not change)"
    return reason


def _unit_reason(result: ServiceResult, checks: JobChecks | None) -> str | None:
    if checks is not None:
        failed = failed_check(checks)
        if failed is not None:
            return failed
    elif not result.condition_result:
        return _CONDITION_FAILED
    elif not result.assert_result:
        return _ASSERT_FAILED
    if result.exec_main_code == _CLD_EXITED and result.exec_main_status != 0:
        return f"the main process exited with status {result.exec_main_status} (Result={result.result})"
    if result.result != "success":
        return f"the unit's Result is '{result.result}'"
    if result.active_state == "failed":
        return "the unit is in the failed state"
    return None


class JobFindings:
    """Open ``job-unverified`` findings: opened by a job that did not verify, closed by one that did."""

    def __init__(self) -> None:
        self._open: dict[str, Finding] = {}

    def record(
        self,
        unit: str,
        job_id: int,
        job_result: str,
        result: ServiceResult,
        seen: JobChecks | None = None,
    ) -> Finding | None:
        """Open or close ``unit``'s finding after job ``job_id`` ended; return it when newly opened.

        ``seen``: the start checks the manager announced around the job, when it did.
        """
        checks = None if seen is None else read_back(seen, result.checks)
        failed = None if checks is None else failed_check(checks)
        if failed is None and not result.invocation_id:
            # Nothing this job tested failed, and no run to judge: the unit never ran, or the
            # manager unloaded it after its job (GC) and reading it loaded a blank copy.
            # Unknown is not "failed".
            return None
        # A stop job (or a clean oneshot): nothing claimed to run and fail.
        if (
            failed is None
            and result.active_state in ("inactive", "deactivating")
            and result.result == "success"
            and result.condition_result
            and result.assert_result
            and (result.exec_main_status == 0 or result.exec_main_code != _CLD_EXITED)
        ):
            self._open.pop(unit, None)
            return None
        reason = unverified_reason(result, job_result, checks=checks)
        if reason is None:
            # A "no" this job did not test is an earlier job's: that job's finding stays open.
            if result.condition_result and result.assert_result:
                self._open.pop(unit, None)
            return None
        finding = Finding(
            FindingKind.JOB_UNVERIFIED,
            unit,
            "",
            "critical",
            f"job {job_id} ended 'done' but {reason}",
        )
        opened = unit not in self._open
        self._open[unit] = finding
        return finding if opened else None

    def findings(self) -> list[Finding]:
        """Currently open job-unverified findings."""
        return list(self._open.values())

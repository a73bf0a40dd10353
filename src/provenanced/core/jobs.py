"""Did a job really do what it said? The judgement after a job ends, and the findings it opens."""

from __future__ import annotations

from provenanced.model import Finding, FindingKind, ServiceResult

_CLD_EXITED = 1


def unverified_reason(
    result: ServiceResult, job_result: str, before_invocation: str | None = None
) -> str | None:
    """Why the unit did not verify after its job, or None when it did."""
    reason = _unit_reason(result)
    if job_result != "done":
        return f"the job ended '{job_result}'" + (f": {reason}" if reason else "")
    if (
        reason is None
        and before_invocation is not None
        and result.invocation_id == before_invocation
    ):
        return "the unit did not run (its InvocationID did not change)"
    return reason


def _unit_reason(result: ServiceResult) -> str | None:
    if not result.condition_result:
        return "a start condition failed (ConditionResult=no): the unit did not run"
    if not result.assert_result:
        return "a start assertion failed (AssertResult=no)"
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
        self, unit: str, job_id: int, job_result: str, result: ServiceResult
    ) -> Finding | None:
        """Open or close ``unit``'s finding after job ``job_id`` ended; return it when newly opened."""
        if not result.invocation_id:
            # The manager already unloaded the unit (GC after its job): its results are gone,
            # and reading it reloaded a blank copy. Unknown is not "failed".
            return None
        # A stop job (or a clean oneshot): nothing claimed to run and fail.
        if (
            result.active_state in ("inactive", "deactivating")
            and result.result == "success"
            and result.condition_result
            and result.assert_result
            and (result.exec_main_status == 0 or result.exec_main_code != _CLD_EXITED)
        ):
            self._open.pop(unit, None)
            return None
        reason = unverified_reason(result, job_result)
        if reason is None:
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

"""Verify the jobs one manager runs: follow its signals, judge each service job that ended done."""

from __future__ import annotations

import time

from provenanced.core.state import AuditState
from provenanced.errors import ManagerCallError
from provenanced.model import JobChecks, Transition
from provenanced.sinks.journal import JournalSink
from provenanced.sinks.metrics import Telemetry
from provenanced.systemd import manager
from provenanced.systemd.bus import ManagerConnection
from provenanced.systemd.checks import ChecksSeen


class JobVerifier:
    """Judges finished jobs into the state's job-unverified findings."""

    def __init__(self, state: AuditState, telemetry: Telemetry, journal: JournalSink) -> None:
        self._state = state
        self._telemetry = telemetry
        self._journal = journal
        self._checks = ChecksSeen()

    def connected(self) -> None:
        """A new connection: jobs in flight on the old one are unknown."""
        self._checks = ChecksSeen()

    def observe(self, event: manager.ManagerEvent) -> JobChecks | None:
        """Take in one signal; for a finished job, what its unit announced around it."""
        return self._checks.observe(event)

    @staticmethod
    def wants(event: manager.ManagerEvent) -> bool:
        """A service job that ended ``done``: the claim a verification checks."""
        return (
            isinstance(event, manager.JobRemoved)
            and event.unit.endswith(".service")
            and event.result == "done"
        )

    async def verify(
        self, conn: ManagerConnection, event: manager.JobRemoved, announced: JobChecks | None
    ) -> list[Transition]:
        """Read the unit after its job and judge it; the transitions of its finding."""
        try:
            result = await manager.get_service_result(conn, event.unit)
        except ManagerCallError:
            return []
        opened, transitions = self._state.record_job(
            event.unit, event.job_id, event.result, result, time.time(), announced
        )
        if opened is not None:
            self._telemetry.record_job_unverified()
            self._journal.send_job_unverified(opened)
        return transitions

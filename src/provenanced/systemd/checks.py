"""What the manager announced about each job's start checks: the evidence a blank read lacks.

A failed ``Condition…=`` never gets an InvocationID; its only trace is a ConditionTimestamp that
moved during the job. The manager announces a new job in its unit's PropertiesChanged (``Job``)
before the job runs, and flushes the unit's pending changes before JobRemoved (systemd
src/core/dbus-job.c, ``bus_job_send_removed_signal``): the first change predates the job's tests,
the last follows them and survives the unit being unloaded right after. A read issued on JobNew
races the job instead (it saw the tested value 26 times in 30 on systemd 252).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from provenanced.model import UNTESTED, JobChecks
from provenanced.systemd import events
from provenanced.systemd.manager import UNIT_IFACE, job_of, start_checks
from provenanced.systemd.names import unit_object_path


class ChecksSeen:
    """Follows one connection's signals; hands out each job's first and last start checks."""

    def __init__(self) -> None:
        self._jobs: dict[str, JobChecks] = {}
        self._fresh: set[str] = set()  # paths of units just loaded from disk, unchanged since
        self._reloading = False

    def observe(self, event: events.ManagerEvent) -> JobChecks | None:
        """Take in one signal; for a JobRemoved, what its unit announced around the job."""
        if isinstance(event, events.Reloading):
            self._reloading = event.active
        elif isinstance(event, events.UnitNew) and not self._reloading:
            # A unit loaded for a job is announced by UnitNew, not by a change, with nothing
            # tested yet. A reload re-creates units with their old state: that is no load.
            self._fresh.add(event.path)
        elif isinstance(event, events.UnitRemoved):
            self._fresh.discard(event.path)
        elif isinstance(event, events.PropertiesChanged) and event.interface == UNIT_IFACE:
            self._changed(event.unit_path, event.changed)
        elif isinstance(event, events.JobRemoved):
            # The manager announces the unit before JobRemoved: from now on its changes say.
            self._fresh.discard(unit_object_path(event.unit))
            return self._jobs.pop(event.job_path, None)
        return None

    def _changed(self, path: str, changed: Mapping[str, Any]) -> None:
        fresh = path in self._fresh
        self._fresh.discard(path)
        job = job_of(changed)
        if job is None:
            return
        checks = start_checks(changed)
        if checks is None:
            return
        seen = self._jobs.get(job)
        first = seen.before if seen else (UNTESTED if fresh else checks)
        self._jobs[job] = JobChecks(first, checks)

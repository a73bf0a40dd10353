"""One manager's audit, kept current: what was observed, who vouches for it, what is open."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, replace

from provenanced.core.audit import definition_hash
from provenanced.core.incremental import IncrementalAudit
from provenanced.core.jobs import JobFindings
from provenanced.core.layered import LayeredMap, changed
from provenanced.core.transitions import Key, diff
from provenanced.core.vouching import expectations
from provenanced.model import (
    BaselineEntry,
    DaemonStatus,
    Expectations,
    Finding,
    FindingKind,
    HomeManagerGeneration,
    JobChecks,
    Observation,
    PackageIndex,
    ServiceResult,
    Transition,
    UnitRecord,
    frozen_map,
)


@dataclass(frozen=True, slots=True)
class Touched:
    """What a partial re-read changed: paths (a fact or the scan) and units (a record or a hash)."""

    paths: frozenset[str] = frozenset()
    units: frozenset[str] = frozenset()

    @classmethod
    def between(cls, old: Observation, new: Observation) -> Touched:
        """What differs from ``old`` to ``new``: what a partial re-read would have reported."""
        old_facts, new_facts = old.facts, new.facts
        paths = {p for p, fact in new_facts.items() if old_facts.get(p) != fact}
        paths.update(p for p in old_facts if p not in new_facts)
        paths.update(old.scanned_files ^ new.scanned_files)
        old_hashes, new_hashes = old.loaded_hashes or {}, new.loaded_hashes or {}
        names = {*old.units, *new.units, *old_hashes, *new_hashes}
        units = {
            n
            for n in names
            if old.units.get(n) != new.units.get(n) or old_hashes.get(n) != new_hashes.get(n)
        }
        return cls(frozenset(paths), frozenset(units))


@dataclass(frozen=True, slots=True)
class Reading:
    """One re-read of the manager and the disk, as the state takes it in."""

    observation: Observation
    touched: Touched | None  # None: everything was read again
    generation: HomeManagerGeneration | None = None  # read on full re-reads only
    manager_reloaded: bool = False  # what is on disk now is what the manager just loaded
    packages: PackageIndex | None = None  # read on full re-reads only; None: no database


class _LoadStates:
    """Units by LoadState, counted once per full observation and then adjusted by each change."""

    def __init__(self) -> None:
        self._base: Mapping[str, UnitRecord] | None = None
        self._base_counts: Counter[str] = Counter()

    def count(self, units: Mapping[str, UnitRecord]) -> Mapping[str, int]:
        base, layer = (units.base, units.layer()) if isinstance(units, LayeredMap) else (units, ())
        if base is not self._base:
            self._base, self._base_counts = base, Counter(u.load_state for u in base.values())
        counts = self._base_counts.copy()
        for name, record in layer:
            old = base.get(name)
            if old is not None:
                counts[old.load_state] -= 1
            if record is not None:
                counts[record.load_state] += 1
        return frozen_map({state: n for state, n in counts.items() if n > 0})


class AuditState:
    """The observation, the expectations, the incremental audit and the open findings of one manager.

    Pure: readings and job outcomes in, transitions out; the daemon does the I/O around it.
    """

    def __init__(self, managed_roots: tuple[str, ...]) -> None:
        self.observation: Observation | None = None
        self.findings: Mapping[Key, Finding] = {}
        self._managed_roots = managed_roots
        self._generation = HomeManagerGeneration()
        self._baseline: Mapping[str, BaselineEntry] = {}
        self._packages: PackageIndex | None = None
        self._exp: Expectations | None = (
            None  # built once per roots, generation, baseline, packages
        )
        self._audit: IncrementalAudit | None = None
        # Each unit's definition hash when the manager last loaded it: the mtime-blind reference.
        self._loaded_hashes: dict[str, str] = {}
        self._published_hashes: Mapping[str, str] = frozen_map()  # what the last observation saw
        self._jobs = JobFindings()
        self._load_states = _LoadStates()

    @property
    def expectations(self) -> Expectations:
        """What vouches for files right now."""
        if self._exp is None:
            self._exp = expectations(
                self._managed_roots, self._generation, self._baseline, self._packages
            )
        return self._exp

    @property
    def generation(self) -> HomeManagerGeneration:
        """The Home Manager generation the expectations follow."""
        return self._generation

    def has_open(self, kind: FindingKind) -> bool:
        """Whether any finding of ``kind`` is open."""
        return any(key[0] is kind for key in self.findings)

    def status(self, daemon: DaemonStatus) -> DaemonStatus:
        """What to publish: ``daemon``'s own flags with the open findings and unit counts."""
        units = self.observation.units if self.observation else frozen_map()
        return replace(
            daemon,
            findings=tuple(self.findings.values()),
            units_by_load_state=self._load_states.count(units),
            units_audited=len(units),
        )

    def accept_baseline(self, accepted: Mapping[str, BaselineEntry]) -> None:
        """Judge against this baseline from the next update on."""
        self._baseline, self._exp = accepted, None

    def follow_roots(self, managed_roots: tuple[str, ...]) -> None:
        """Judge against other managed roots, and forget the generation (read it again)."""
        self._managed_roots, self._generation, self._exp = (
            managed_roots,
            HomeManagerGeneration(),
            None,
        )

    def update(self, reading: Reading, now: float) -> list[Transition]:
        """Take in a re-read: judge what it touched (or everything) and diff the open findings."""
        if reading.generation is not None and reading.generation is not self._generation:
            self._generation, self._exp = reading.generation, None
        if reading.touched is None and reading.packages is not self._packages:
            self._packages, self._exp = reading.packages, None
        previous = self.observation
        obs = self._with_loaded_hashes(reading)
        self.observation = obs
        exp = self.expectations
        touched = reading.touched
        kept = self._audit is not None and self._audit.fits(obs, exp)
        if kept and touched is None and previous is not None:
            # A full re-read mostly finds what was there: judging only what differs costs a
            # comparison per unit and file instead of a whole audit.
            touched = Touched.between(previous, obs)
        if self._audit is None or not kept or touched is None:
            self._audit = None  # let the old one go first: two at once set the RSS peak
            self._audit = IncrementalAudit(obs, exp)
            found = self._audit.findings
        else:
            found = self._audit.update(obs, touched.paths, touched.units)
        return self._diff((*found, *self._jobs.findings()), now)

    def record_job(
        self,
        unit: str,
        job_id: int,
        job_result: str,
        result: ServiceResult,
        now: float,
        seen: JobChecks | None = None,
    ) -> tuple[Finding | None, list[Transition]]:
        """Take in a finished job's outcome: the finding it newly opened, and the transitions."""
        opened = self._jobs.record(unit, job_id, job_result, result, seen)
        others = (f for f in self.findings.values() if f.kind is not FindingKind.JOB_UNVERIFIED)
        return opened, self._diff((*others, *self._jobs.findings()), now)

    def _diff(self, found: tuple[Finding, ...], now: float) -> list[Transition]:
        self.findings, transitions = diff(self.findings, found, now)
        return transitions

    def _with_loaded_hashes(self, reading: Reading) -> Observation:
        obs = reading.observation
        if reading.touched is None:
            if reading.manager_reloaded:
                self._loaded_hashes = {}
            for name, unit in obs.units.items():
                if name not in self._loaded_hashes:
                    self._loaded_hashes[name] = definition_hash(unit, obs.facts)
            self._published_hashes = frozen_map(self._loaded_hashes)
        else:
            gone: list[str] = []
            added: dict[str, str] = {}
            for name in reading.touched.units:
                record = obs.units.get(name)
                if record is None:
                    if self._loaded_hashes.pop(name, None) is not None:
                        gone.append(name)
                elif name not in self._loaded_hashes:
                    # A unit seen for the first time: what is on disk now is the reference.
                    added[name] = self._loaded_hashes[name] = definition_hash(record, obs.facts)
            # The published map is layered over the last one: a change does not copy every hash.
            self._published_hashes = changed(self._published_hashes, added, gone)
        return replace(obs, loaded_hashes=self._published_hashes)

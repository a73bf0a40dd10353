"""The audit state of one manager, driven with plain readings: what opens, what closes, and when."""

from __future__ import annotations

from dataclasses import replace

from provenanced.core.audit import audit
from provenanced.core.state import AuditState, Reading, Touched
from provenanced.core.vouching import expectations
from provenanced.model import (
    BaselineEntry,
    ExpectedLink,
    FileFact,
    FileKind,
    FindingKind,
    HomeManagerGeneration,
    Observation,
    PackagedFile,
    PackageIndex,
    ServiceResult,
    Tier,
    UnitDir,
    UnitRecord,
    frozen_map,
)

K = FindingKind
CONFIG = "/home/u/.config/systemd/user"
WEB = f"{CONFIG}/web.service"
JOB = f"{CONFIG}/job.service"
FILES = "/nix/store/aaaa-home-manager-files"
WEB_TARGET = f"{FILES}/.config/systemd/user/web.service"
ROOTS = ("/nix/store",)
DIRS = (UnitDir(CONFIG, Tier.CONFIG, 0),)
GENERATION = HomeManagerGeneration(
    "/nix/store/gggg-home-manager-generation",
    FILES,
    frozen_map({WEB: ExpectedLink(WEB, WEB_TARGET, "/nix/store/bbbb-web.service", "s-web")}),
)
WEB_UNIT = UnitRecord("web.service", fragment_path=WEB)
JOB_UNIT = UnitRecord("job.service", fragment_path=JOB)


def managed_link(sha: str = "s-web") -> FileFact:
    return FileFact(
        WEB, FileKind.SYMLINK, WEB_TARGET, "/nix/store/bbbb-web.service", 1000, 0o444, 9, sha
    )


def regular(path: str, sha: str) -> FileFact:
    return FileFact(path, FileKind.FILE, uid=1000, mode=0o644, size=9, sha256=sha)


def observation(*facts: FileFact, units: tuple[UnitRecord, ...] = (WEB_UNIT,)) -> Observation:
    return Observation(
        units=frozen_map({u.name: u for u in units}),
        facts=frozen_map({f.path: f for f in facts}),
        unit_dirs=DIRS,
        uid=1000,
        scanned_files=frozenset(f.path for f in facts),
    )


def full(obs: Observation, reloaded: bool = False) -> Reading:
    return Reading(obs, None, GENERATION, manager_reloaded=reloaded)


def keys(state: AuditState) -> set[tuple[object, str, str]]:
    return set(state.findings)


def result(**changes: object) -> ServiceResult:
    ok = ServiceResult("inv-1", "success", 1, 0, True, True, "active", "running")
    return replace(ok, **changes)  # type: ignore[arg-type]


class TestUpdate:
    def test_a_full_reading_opens_what_the_audit_finds(self) -> None:
        """The open set after a full reading is the audit of that observation."""
        state = AuditState(ROOTS)
        obs = observation(regular(WEB, "s-edited"))
        transitions = state.update(full(obs), now=10.0)
        exp = expectations(ROOTS, GENERATION, {})
        assert {f.key for f in audit(obs, exp)} == keys(state) != set()
        assert {(t.state, t.finding.since) for t in transitions} == {("detected", 10.0)}

    def test_a_finding_that_stays_open_makes_no_second_transition(self) -> None:
        """Reading the same drift again keeps the finding and its ``since``."""
        state = AuditState(ROOTS)
        state.update(full(observation(regular(WEB, "s-edited"))), now=1.0)
        again = state.update(full(observation(regular(WEB, "s-edited"))), now=2.0)
        assert again == [] and {f.since for f in state.findings.values()} == {1.0}

    def test_a_repair_resolves_the_finding(self) -> None:
        """Putting the managed link back closes link-replaced (and the manager must reload it)."""
        state = AuditState(ROOTS)
        state.update(full(observation(regular(WEB, "s-edited"))), now=1.0)
        transitions = state.update(full(observation(managed_link())), now=2.0)
        assert {(t.state, t.finding.kind) for t in transitions} == {
            ("resolved", K.LINK_REPLACED),
            ("detected", K.STALE_LOAD),
        }

    def test_content_changed_since_the_load_is_a_stale_load(self) -> None:
        """The first reading is the reference; a later one with other content is stale."""
        state = AuditState(ROOTS)
        state.update(full(observation(managed_link("s-web"))), now=1.0)
        state.update(full(observation(managed_link("s-new"))), now=2.0)
        assert (K.STALE_LOAD, "web.service", WEB) in keys(state)

    def test_a_manager_reload_takes_the_disk_as_the_new_reference(self) -> None:
        """After the manager reloaded, what is on disk is what it runs: no stale-load."""
        state = AuditState(ROOTS)
        state.update(full(observation(managed_link("s-web"))), now=1.0)
        state.update(full(observation(managed_link("s-new")), reloaded=True), now=2.0)
        assert not state.has_open(K.STALE_LOAD)

    def test_a_partial_reading_judges_what_it_touched(self) -> None:
        """A touched path is judged again without a full reading."""
        state = AuditState(ROOTS)
        state.update(full(observation(managed_link())), now=1.0)
        touched = Touched(frozenset({WEB}), frozenset({"web.service"}))
        state.update(Reading(observation(regular(WEB, "s-web")), touched), now=2.0)
        assert (K.LINK_REPLACED, "web.service", WEB) in keys(state)

    def test_an_unloaded_unit_loses_its_reference(self) -> None:
        """A unit read again after it was unloaded takes the disk as its reference."""
        state = AuditState(ROOTS)
        state.update(full(observation(managed_link("s-web"))), now=1.0)
        gone = Touched(frozenset(), frozenset({"web.service"}))
        state.update(Reading(observation(managed_link("s-web"), units=()), gone), now=2.0)
        back = Reading(observation(managed_link("s-new")), gone)
        state.update(back, now=3.0)
        assert not state.has_open(K.STALE_LOAD)


class TestExpectations:
    def test_a_new_baseline_vouches_from_the_next_update_on(self) -> None:
        """A regular file the accepted baseline records is no longer unmanaged."""
        state = AuditState(ROOTS)
        obs = observation(regular(JOB, "s-job"), units=(JOB_UNIT,))
        state.update(full(obs), now=1.0)
        assert state.has_open(K.UNMANAGED_UNIT)
        state.accept_baseline({JOB: BaselineEntry(JOB, FileKind.FILE, None, None, "s-job")})
        state.update(full(obs), now=2.0)
        assert not state.has_open(K.UNMANAGED_UNIT)

    def test_the_expectations_follow_the_generation_read(self) -> None:
        """A full reading's generation is what Home Manager links are judged against."""
        state = AuditState(ROOTS)
        state.update(full(observation(managed_link())), now=1.0)
        assert state.expectations.home_manager_files == FILES
        assert state.generation is GENERATION

    def test_other_roots_forget_the_generation(self) -> None:
        """New managed roots rebuild the expectations and read the generation again."""
        state = AuditState(ROOTS)
        state.update(full(observation(managed_link())), now=1.0)
        state.follow_roots(("/gnu/store",))
        assert state.expectations.managed_roots == ("/gnu/store",)
        assert state.expectations.home_manager_files is None

    def test_the_expectations_follow_the_package_index_of_full_readings(self) -> None:
        """A new package database is judged against at the next full reading, not before."""
        vendor = "/usr/lib/systemd/user"
        unit = f"{vendor}/dbus.service"
        dirs = (*DIRS, UnitDir(vendor, Tier.VENDOR, 1))
        obs = replace(
            observation(managed_link(), replace(regular(unit, "s-dbus"), md5="m-edited")),
            unit_dirs=dirs,
        )
        index = PackageIndex(
            "dpkg",
            "md5",
            frozenset({vendor}),
            frozen_map({unit: PackagedFile(unit, ("dbus",), frozenset({"m-dbus"}))}),
        )
        state = AuditState(ROOTS)
        state.update(full(obs), now=1.0)
        assert not state.has_open(K.PACKAGE_MODIFIED)
        partial = Reading(obs, Touched(frozenset({unit})), packages=index)
        state.update(partial, now=2.0)
        assert state.expectations.packages is None
        state.update(replace(full(obs), packages=index), now=3.0)
        assert state.expectations.packages is index
        assert state.has_open(K.PACKAGE_MODIFIED)


class TestJobs:
    def test_a_job_that_did_not_verify_opens_one_finding(self) -> None:
        """A failed condition opens job-unverified once, with a detected transition."""
        state = AuditState(ROOTS)
        state.update(full(observation(managed_link())), now=1.0)
        opened, transitions = state.record_job(
            "web.service", 7, "done", result(condition_result=False), now=2.0
        )
        assert opened is not None and opened.kind is K.JOB_UNVERIFIED
        assert [(t.state, t.finding.kind) for t in transitions] == [("detected", K.JOB_UNVERIFIED)]

    def test_the_next_job_that_verifies_closes_it_and_keeps_the_rest(self) -> None:
        """A good run resolves job-unverified; file findings stay open."""
        state = AuditState(ROOTS)
        state.update(full(observation(regular(WEB, "s-edited"))), now=1.0)
        state.record_job("web.service", 7, "done", result(condition_result=False), now=2.0)
        _, transitions = state.record_job("web.service", 8, "done", result(), now=3.0)
        assert [(t.state, t.finding.kind) for t in transitions] == [("resolved", K.JOB_UNVERIFIED)]
        assert state.has_open(K.LINK_REPLACED)

    def test_job_findings_survive_file_updates(self) -> None:
        """A re-read of the files does not close a job finding."""
        state = AuditState(ROOTS)
        state.record_job("web.service", 7, "done", result(condition_result=False), now=1.0)
        state.update(full(observation(managed_link())), now=2.0)
        assert state.has_open(K.JOB_UNVERIFIED)

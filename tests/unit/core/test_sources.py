"""A generated unit's source (its SourcePath) judged like its fragment: who vouches for it."""

from __future__ import annotations

import pytest

from provenanced.core.audit import audit, definition_hash
from provenanced.core.incremental import IncrementalAudit
from provenanced.core.provenance import provenance_of
from provenanced.core.sources import is_vendor_source, quadlet_source_dirs
from provenanced.core.unitpath import UserDirs
from provenanced.model import (
    BaselineEntry,
    Expectations,
    ExpectedLink,
    FileFact,
    FileKind,
    FindingKind,
    Observation,
    Owner,
    Tier,
    UnitDir,
    UnitRecord,
    frozen_map,
)

K = FindingKind
UID = 1000
HOME = "/home/u"
GENERATOR = "/run/user/1000/systemd/generator"
QUADLET = f"{HOME}/.config/containers/systemd"
SOURCE = f"{QUADLET}/web.container"
FILES = "/nix/store/aaaa-home-manager-files"
SOURCE_TARGET = f"{FILES}/.config/containers/systemd/web.container"
SOURCE_STORE = "/nix/store/bbbb-web.container"
FRAGMENT = f"{GENERATOR}/web.service"
DIRS = (UnitDir(GENERATOR, Tier.GENERATOR, 0),)
UNIT = UnitRecord("web.service", fragment_path=FRAGMENT, source_path=SOURCE)

HM = Expectations(
    home_manager_generation="/nix/store/gggg-home-manager-generation",
    home_manager_files=FILES,
    home_manager_links=frozen_map(
        {SOURCE: ExpectedLink(SOURCE, SOURCE_TARGET, SOURCE_STORE, "s-web")}
    ),
)
NOBODY = Expectations()


def link(path: str, target: str, resolved: str | None, sha: str = "s-web") -> FileFact:
    return FileFact(
        path,
        FileKind.SYMLINK,
        target=target,
        resolved=resolved,
        uid=UID,
        mode=0o444,
        size=9,
        sha256=sha,
    )


def regular(path: str, sha: str = "s-edited", mode: int = 0o644) -> FileFact:
    return FileFact(path, FileKind.FILE, uid=UID, mode=mode, size=9, sha256=sha)


def observe(source: FileFact | None, unit: UnitRecord = UNIT) -> Observation:
    facts = {FRAGMENT: regular(FRAGMENT, "s-generated")}
    if source is not None:
        facts[source.path] = source
    return Observation(
        units=frozen_map({unit.name: unit}),
        facts=frozen_map(facts),
        unit_dirs=DIRS,
        uid=UID,
    )


def keys(obs: Observation, exp: Expectations) -> set[tuple[FindingKind, str, str]]:
    return {f.key for f in audit(obs, exp)}


class TestQuadletSourceDirs:
    def test_rootless_search_path(self) -> None:
        """The runtime dir, the user's config dir, then the admin's per-user dirs, then the vendor's."""
        dirs = UserDirs(HOME, f"{HOME}/.config", f"{HOME}/.local/share", "/run/user/1000")
        assert quadlet_source_dirs(dirs, UID) == (
            "/run/user/1000/containers/systemd",
            QUADLET,
            "/etc/containers/systemd/users",
            "/etc/containers/systemd/users/1000",
            "/usr/share/containers/systemd/users",
            "/usr/share/containers/systemd/users/1000",
        )


class TestSourceJudgement:
    def test_home_manager_linked_source_is_clean(self) -> None:
        """A source that is Home Manager's link into the store leaves its generated unit clean."""
        assert keys(observe(link(SOURCE, SOURCE_TARGET, SOURCE_STORE)), HM) == set()

    def test_replaced_source_link_is_link_replaced_on_the_source(self) -> None:
        """A source link replaced by an edited regular file is link-replaced on the source's path."""
        found = audit(observe(regular(SOURCE)), HM)
        assert [(f.kind, f.unit, f.path, f.severity) for f in found] == [
            (K.LINK_REPLACED, "web.service", SOURCE, "critical")
        ]

    def test_source_in_the_store_is_vouched_by_the_managed_root(self) -> None:
        """Home Manager's services.podman form: the unit's SourcePath is a store file."""
        store_source = "/nix/store/cccc-podman-quadlets/web.container"
        unit = UnitRecord("web.service", fragment_path=FRAGMENT, source_path=store_source)
        assert keys(observe(regular(store_source, "s-web", 0o444), unit), NOBODY) == set()

    def test_plain_source_nobody_vouches_for_is_unmanaged(self) -> None:
        """A regular source file with no baseline, link or store behind it is unmanaged."""
        assert keys(observe(regular(SOURCE)), NOBODY) == {(K.UNMANAGED_UNIT, "web.service", SOURCE)}

    def test_baseline_vouches_for_a_plain_source_until_it_is_edited(self) -> None:
        """The accepted baseline vouches for the source it recorded; an edit is unmanaged."""
        base = Expectations(
            baseline=frozen_map(
                {SOURCE: BaselineEntry(SOURCE, FileKind.FILE, None, None, "s-accepted")}
            )
        )
        assert keys(observe(regular(SOURCE, "s-accepted")), base) == set()
        found = audit(observe(regular(SOURCE, "s-edited")), base)
        assert [(f.kind, f.path) for f in found] == [(K.UNMANAGED_UNIT, SOURCE)]
        assert "changed since the accepted baseline" in found[0].detail

    def test_vendor_source_is_vouched_by_the_system(self) -> None:
        """A source under /usr is the distribution's, like a vendor-tier unit."""
        vendor = "/usr/share/containers/systemd/users/web.container"
        unit = UnitRecord("web.service", fragment_path=FRAGMENT, source_path=vendor)
        assert keys(observe(regular(vendor), unit), NOBODY) == set()

    def test_group_writable_source_is_unsafe(self) -> None:
        """Anyone who may rewrite the source may rewrite the unit generated from it."""
        found = keys(observe(regular(SOURCE, mode=0o664)), NOBODY)
        assert (K.UNSAFE_MODE, "web.service", SOURCE) in found

    def test_source_edit_changes_the_definition_hash(self) -> None:
        """The loaded-definition hash covers the source, so stale-load sees an mtime-blind edit."""
        before = definition_hash(UNIT, observe(regular(SOURCE, "s-1")).facts)
        after = definition_hash(UNIT, observe(regular(SOURCE, "s-2")).facts)
        assert before != after


class TestIncrementalSources:
    @pytest.mark.parametrize(
        "changed",
        [regular(SOURCE), link(SOURCE, SOURCE_TARGET, SOURCE_STORE)],
        ids=["replaced", "restored"],
    )
    def test_a_changed_source_re_judges_its_unit(self, changed: FileFact) -> None:
        """A source path change alone brings the incremental audit to what a full audit finds."""
        start = observe(
            link(SOURCE, SOURCE_TARGET, SOURCE_STORE)
            if changed.kind is FileKind.FILE
            else regular(SOURCE)
        )
        kept = IncrementalAudit(start, HM)
        after = observe(changed)
        assert kept.update(after, {SOURCE}, ()) == audit(after, HM)

    def test_a_unit_that_drops_its_source_drops_the_finding(self) -> None:
        """Once the unit no longer names the source, its finding goes with it."""
        kept = IncrementalAudit(observe(regular(SOURCE)), HM)
        assert kept.findings
        unsourced = UnitRecord("web.service", fragment_path=FRAGMENT)
        assert kept.update(observe(regular(SOURCE), unsourced), (), {"web.service"}) == ()


class TestShowSource:
    def test_show_names_the_source_and_who_vouches(self) -> None:
        """``show`` has a source row with its owner."""
        shown = provenance_of(UNIT, observe(link(SOURCE, SOURCE_TARGET, SOURCE_STORE)), HM)
        assert shown.to_json()["source"] == {
            "path": SOURCE,
            "tier": "source",
            "kind": "symlink",
            "target": SOURCE_TARGET,
            "owner": Owner.HOME_MANAGER.value,
            "package": None,
            "sha256": "s-web",
        }
        replaced = provenance_of(UNIT, observe(regular(SOURCE)), HM)
        assert replaced.source is not None and replaced.source.owner is Owner.NONE


class TestSystemSources:
    def test_the_kernels_tables_are_vouched_for(self) -> None:
        """A mount unit's SourcePath is /proc/self/mountinfo: the kernel's, never drift."""
        assert is_vendor_source("/proc/self/mountinfo")
        assert is_vendor_source("/proc/swaps")
        assert not is_vendor_source("/home/u/.config/containers/systemd/web.container")

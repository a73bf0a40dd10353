"""Table-driven tests of the pure provenance core: every drift kind from plain data."""

from __future__ import annotations

from dataclasses import replace

import pytest

from provenanced.core.audit import audit, definition_hash
from provenanced.core.provenance import provenance_of
from provenanced.core.vouching import home_manager_files_dir, vouch
from provenanced.model import (
    BaselineEntry,
    Expectations,
    ExpectedLink,
    FileFact,
    FileKind,
    FindingKind,
    Observation,
    Owner,
    PackagedFile,
    PackageIndex,
    Tier,
    UnitDir,
    UnitRecord,
    frozen_map,
)

K = FindingKind
UID = 1000
HOME = "/home/u"
CONFIG = f"{HOME}/.config/systemd/user"
CONTROL = f"{HOME}/.config/systemd/user.control"
ADMIN = "/etc/systemd/user"
VENDOR = "/usr/lib/systemd/user"
FILES = "/nix/store/aaaa-home-manager-files"
OLD_FILES = "/nix/store/0000-home-manager-files"
WEB = f"{CONFIG}/web.service"
WEB_TARGET = f"{FILES}/.config/systemd/user/web.service"
WEB_STORE = "/nix/store/bbbb-web.service"
DROPIN = f"{CONFIG}/web.service.d/10-env.conf"
DROPIN_TARGET = f"{FILES}/.config/systemd/user/web.service.d/10-env.conf"
DROPIN_STORE = "/nix/store/cccc-10-env.conf"

DIRS = (
    UnitDir(CONTROL, Tier.CONTROL, 0),
    UnitDir(CONFIG, Tier.CONFIG, 1),
    UnitDir(ADMIN, Tier.ADMIN, 2),
    UnitDir(VENDOR, Tier.VENDOR, 3),
)


def link(
    path: str, target: str, resolved: str | None, sha: str | None = "s-web", **kw: object
) -> FileFact:
    return FileFact(
        path,
        FileKind.SYMLINK,
        target=target,
        resolved=resolved,
        uid=UID,
        mode=0o444,
        size=10 if resolved else None,
        sha256=sha,
        **kw,
    )  # type: ignore[arg-type]


def regular(
    path: str, sha: str = "s-other", mode: int = 0o644, uid: int = UID, size: int = 10
) -> FileFact:
    return FileFact(path, FileKind.FILE, uid=uid, mode=mode, size=size, sha256=sha)


EXPECT = Expectations(
    managed_roots=("/nix/store",),
    home_manager_generation="/nix/store/gggg-home-manager-generation",
    home_manager_files=FILES,
    home_manager_links=frozen_map(
        {
            WEB: ExpectedLink(WEB, WEB_TARGET, WEB_STORE, "s-web"),
            DROPIN: ExpectedLink(DROPIN, DROPIN_TARGET, DROPIN_STORE, "s-env"),
        }
    ),
)

CLEAN_FACTS = {
    WEB: link(WEB, WEB_TARGET, WEB_STORE, "s-web"),
    DROPIN: link(DROPIN, DROPIN_TARGET, DROPIN_STORE, "s-env"),
}
WEB_UNIT = UnitRecord("web.service", fragment_path=WEB, dropin_paths=(DROPIN,))


def observe(
    facts: dict[str, FileFact] | None = None,
    units: list[UnitRecord] | None = None,
    scanned: tuple[str, ...] = (),
    loaded_hashes: dict[str, str] | None = None,
) -> Observation:
    merged = {**CLEAN_FACTS, **(facts or {})}
    records = units if units is not None else [WEB_UNIT]
    return Observation(
        units=frozen_map({u.name: u for u in records}),
        facts=frozen_map(merged),
        unit_dirs=DIRS,
        uid=UID,
        scanned_files=frozenset(CLEAN_FACTS) | frozenset(scanned),
        loaded_hashes=loaded_hashes,
    )


def kinds(obs: Observation, exp: Expectations = EXPECT) -> set[tuple[FindingKind, str, str]]:
    return {f.key for f in audit(obs, exp)}


class TestAuditClean:
    def test_clean_home_manager_tree_has_no_findings(self) -> None:
        """A tree exactly as the current generation links it yields nothing."""
        assert audit(observe(), EXPECT) == ()

    def test_vendor_units_are_vouched_by_the_system(self) -> None:
        """A vendor fragment with no expectations is not drift."""
        vendor = f"{VENDOR}/dbus.service"
        obs = observe(
            {vendor: regular(vendor, uid=0)},
            [WEB_UNIT, UnitRecord("dbus.service", fragment_path=vendor)],
        )
        assert audit(obs, EXPECT) == ()


CASES = [
    pytest.param(
        {WEB: regular(WEB, sha="s-web")},
        (),
        K.LINK_REPLACED,
        WEB,
        "latent",
        id="link-replaced-latent",
    ),
    pytest.param(
        {WEB: regular(WEB, sha="s-x")},
        (),
        K.LINK_REPLACED,
        WEB,
        "divergent",
        id="link-replaced-divergent",
    ),
    pytest.param(
        {WEB: link(WEB, "/nix/store/dddd-other.service", "/nix/store/dddd-other.service")},
        (),
        K.LINK_RETARGETED,
        WEB,
        "Home Manager links it",
        id="link-retargeted",
    ),
    pytest.param(
        {WEB: link(WEB, WEB_TARGET, None, None)},
        (),
        K.LINK_DANGLING,
        WEB,
        "does not exist",
        id="link-dangling",
    ),
    pytest.param(
        {WEB: FileFact(WEB, FileKind.MISSING)},
        (),
        K.MANAGED_MISSING,
        WEB,
        "absent",
        id="managed-missing",
    ),
    pytest.param(
        {WEB: link(WEB, f"{OLD_FILES}/.config/systemd/user/web.service", WEB_STORE)},
        (),
        K.ORPHAN_LINK,
        WEB,
        OLD_FILES,
        id="orphan-link-expected-path",
    ),
    pytest.param(
        {
            f"{CONFIG}/old.service": link(
                f"{CONFIG}/old.service", f"{OLD_FILES}/x", "/nix/store/e-old"
            )
        },
        (f"{CONFIG}/old.service",),
        K.ORPHAN_LINK,
        f"{CONFIG}/old.service",
        "not the current",
        id="orphan-link-leftover",
    ),
    pytest.param(
        {f"{CONFIG}/mine.service": regular(f"{CONFIG}/mine.service")},
        (f"{CONFIG}/mine.service",),
        K.UNMANAGED_UNIT,
        f"{CONFIG}/mine.service",
        "vouches",
        id="unmanaged-unit",
    ),
    pytest.param(
        {f"{ADMIN}/web.service.d/stale.conf": regular(f"{ADMIN}/web.service.d/stale.conf", uid=0)},
        (f"{ADMIN}/web.service.d/stale.conf",),
        K.UNMANAGED_DROPIN,
        f"{ADMIN}/web.service.d/stale.conf",
        "admin tier",
        id="unmanaged-dropin-admin",
    ),
    pytest.param(
        {
            f"{CONTROL}/web.service.d/50-CPUQuota.conf": regular(
                f"{CONTROL}/web.service.d/50-CPUQuota.conf"
            )
        },
        (f"{CONTROL}/web.service.d/50-CPUQuota.conf",),
        K.UNMANAGED_DROPIN,
        f"{CONTROL}/web.service.d/50-CPUQuota.conf",
        "control tier",
        id="unmanaged-dropin-control",
    ),
    pytest.param(
        {WEB: link(WEB, "/dev/null", "/dev/null", None)},
        (),
        K.MASKED,
        WEB,
        "masked",
        id="masked-link",
    ),
    pytest.param(
        {WEB: regular(WEB, sha="s-w", mode=0o664)},
        (),
        K.UNSAFE_MODE,
        WEB,
        "group",
        id="unsafe-mode-group",
    ),
    pytest.param(
        {f"{CONFIG}/x.service": regular(f"{CONFIG}/x.service", uid=4242)},
        (f"{CONFIG}/x.service",),
        K.FOREIGN_OWNER,
        f"{CONFIG}/x.service",
        "uid 4242",
        id="foreign-owner",
    ),
    pytest.param(
        {f"{CONFIG}/x.service": link(f"{CONFIG}/x.service", "/tmp/x", None, None)},
        (f"{CONFIG}/x.service",),
        K.LINK_DANGLING,
        f"{CONFIG}/x.service",
        "does not exist",
        id="link-dangling-unexpected",
    ),
    pytest.param(
        {f"{CONFIG}/x.service": link(f"{CONFIG}/x.service", "/srv/x.service", "/srv/x.service")},
        (f"{CONFIG}/x.service",),
        K.UNMANAGED_UNIT,
        f"{CONFIG}/x.service",
        "outside the managed",
        id="unmanaged-link-outside-roots",
    ),
]


class TestAuditFileKinds:
    @pytest.mark.parametrize(("facts", "scanned", "kind", "path", "detail"), CASES)
    def test_detects(
        self,
        facts: dict[str, FileFact],
        scanned: tuple[str, ...],
        kind: FindingKind,
        path: str,
        detail: str,
    ) -> None:
        """Each injected file state yields its drift kind with a detail a person understands."""
        findings = [f for f in audit(observe(facts, scanned=scanned), EXPECT) if f.kind is kind]
        assert [f.path for f in findings] == [path]
        assert detail in findings[0].detail

    def test_divergent_replacement_is_critical(self) -> None:
        """A replaced link with other content changes behaviour, so it is critical; latent is a warning."""
        divergent = audit(observe({WEB: regular(WEB, sha="x")}), EXPECT)
        latent = audit(observe({WEB: regular(WEB, sha="s-web")}), EXPECT)
        assert [f.severity for f in divergent] == ["critical"]
        assert [f.severity for f in latent] == ["warning"]

    def test_link_into_managed_root_is_vouched_without_home_manager(self) -> None:
        """A store link nobody else knows about is vouched for by the managed root."""
        path = f"{CONFIG}/extra.service"
        obs = observe(
            {path: link(path, "/nix/store/ffff-extra.service", "/nix/store/ffff-extra.service")},
            scanned=(path,),
        )
        assert audit(obs, EXPECT) == ()

    def test_other_writable_link_target_is_unsafe(self) -> None:
        """A link's own mode is meaningless; the target's writable bits are what matter."""
        path = f"{CONFIG}/w.service"
        fact = replace(link(path, "/nix/store/w", "/nix/store/w"), mode=0o666)
        findings = audit(observe({path: fact}, scanned=(path,)), EXPECT)
        assert [(f.kind, f.severity) for f in findings] == [(K.UNSAFE_MODE, "critical")]

    def test_foreign_owner_not_reported_in_admin_tier(self) -> None:
        """/etc belongs to root by design; only the user's own directories must be the user's."""
        path = f"{ADMIN}/web.service.d/ok.conf"
        base = {path: BaselineEntry(path, FileKind.FILE, None, None, "s-other")}
        exp = replace(EXPECT, baseline=frozen_map(base))
        assert audit(observe({path: regular(path, uid=0)}, scanned=(path,)), exp) == ()


class TestAuditStrayNames:
    @pytest.mark.parametrize(
        "path",
        [
            f"{CONFIG}/CuU5WPnS",
            f"{CONFIG}/beta.service.backup",
            f"{CONFIG}/.web.service.swp",
            f"{CONFIG}/web.service~",
            f"{CONFIG}/web.service.d/10-env.conf.bak",
            f"{CONFIG}/default.target.wants/CuAbCdEf",
            f"{CONTROL}/notes/web.service",
        ],
    )
    @pytest.mark.parametrize("kind", ["file", "old-generation-link", "dangling-link"])
    def test_a_name_the_manager_never_loads_is_no_units_drift(self, path: str, kind: str) -> None:
        """A temp link, a backup or a swap file is nothing the manager reads: no finding at all."""
        fact = {
            "file": regular(path),
            "old-generation-link": link(path, f"{OLD_FILES}/x", "/nix/store/e-old"),
            "dangling-link": link(path, "/nowhere", None),
        }[kind]
        assert kinds(observe({path: fact}, scanned=(path,))) == set()

    @pytest.mark.parametrize(
        "path",
        [
            f"{CONFIG}/mine.service",
            f"{CONFIG}/web.service.d/20-mine.conf",
            f"{CONFIG}/default.target.wants/mine.service",
        ],
    )
    def test_a_unit_name_in_the_same_place_is_still_judged(self, path: str) -> None:
        """The same stray file with a name the manager loads stays a unit's drift."""
        assert kinds(observe({path: regular(path)}, scanned=(path,))) != set()


class TestAuditBaseline:
    PATH = f"{CONFIG}/mine.service"

    def exp(self, entry: BaselineEntry) -> Expectations:
        return replace(EXPECT, baseline=frozen_map({entry.path: entry}))

    def test_baseline_vouches_for_unchanged_file(self) -> None:
        """A file recorded in the accepted baseline with the same content is vouched for."""
        exp = self.exp(BaselineEntry(self.PATH, FileKind.FILE, None, None, "s-other"))
        assert audit(observe({self.PATH: regular(self.PATH)}, scanned=(self.PATH,)), exp) == ()

    def test_changed_content_is_unmanaged(self) -> None:
        """An edit since the baseline is no longer vouched for, and says what changed."""
        exp = self.exp(BaselineEntry(self.PATH, FileKind.FILE, None, None, "s-before"))
        findings = audit(observe({self.PATH: regular(self.PATH)}, scanned=(self.PATH,)), exp)
        assert [f.kind for f in findings] == [K.UNMANAGED_UNIT]
        assert "changed since the accepted baseline" in findings[0].detail

    @pytest.mark.parametrize(
        "error", ["too large to hash (1073741824 bytes > 1048576)", "Permission denied"]
    )
    def test_unread_content_is_never_vouched_for(self, error: str) -> None:
        """A file whose content could not be read matches no baseline hash, and says why."""
        exp = self.exp(BaselineEntry(self.PATH, FileKind.FILE, None, None, None))
        fact = replace(regular(self.PATH), sha256=None, error=error)
        findings = audit(observe({self.PATH: fact}, scanned=(self.PATH,)), exp)
        assert [f.kind for f in findings] == [K.UNMANAGED_UNIT]
        assert findings[0].detail.endswith(f"its content is unknown: {error}")

    def test_a_file_the_manager_never_reads_is_vouched_for_by_presence(self) -> None:
        """A name systemd ignores is not hashed; the baseline vouches for it being there."""
        path = f"{CONFIG}/README.md"
        exp = self.exp(BaselineEntry(path, FileKind.FILE, None, None, "s-recorded-earlier"))
        fact = replace(regular(path), sha256=None)
        assert audit(observe({path: fact}, scanned=(path,)), exp) == ()

    def test_baseline_managed_link_replaced(self) -> None:
        """A managed link recorded by the baseline and now a regular file is link-replaced."""
        exp = self.exp(
            BaselineEntry(self.PATH, FileKind.SYMLINK, "/nix/store/m", "/nix/store/m", "s-other")
        )
        findings = audit(observe({self.PATH: regular(self.PATH)}, scanned=(self.PATH,)), exp)
        assert [(f.kind, f.detail.split(":")[0]) for f in findings] == [(K.LINK_REPLACED, "latent")]

    def test_baseline_managed_link_missing(self) -> None:
        """A managed link recorded by the baseline and now gone is managed-missing."""
        exp = self.exp(
            BaselineEntry(self.PATH, FileKind.SYMLINK, "/nix/store/m", "/nix/store/m", "s")
        )
        assert kinds(observe(), exp) == {(K.MANAGED_MISSING, "mine.service", self.PATH)}

    def test_a_home_manager_link_in_the_baseline_expects_nothing(self) -> None:
        """A unit Home Manager removed is not managed-missing because the baseline saw its link."""
        target = f"{OLD_FILES}/.config/systemd/user/mine.service"
        exp = self.exp(BaselineEntry(self.PATH, FileKind.SYMLINK, target, "/nix/store/m", "s"))
        assert kinds(observe(), exp) == set()

    def test_a_home_manager_link_in_the_baseline_vouches_for_nothing(self) -> None:
        """An old generation's link stays an orphan even when the baseline recorded it."""
        target = f"{OLD_FILES}/.config/systemd/user/mine.service"
        exp = self.exp(BaselineEntry(self.PATH, FileKind.SYMLINK, target, "/nix/store/m", "s"))
        obs = observe({self.PATH: link(self.PATH, target, "/nix/store/m")}, scanned=(self.PATH,))
        assert kinds(obs, exp) == {(K.ORPHAN_LINK, "mine.service", self.PATH)}
        fact = obs.facts[self.PATH]
        assert vouch(self.PATH, fact, exp) is Owner.NONE

    def test_baseline_link_retargeted_outside_roots(self) -> None:
        """A baseline link now pointing elsewhere outside the roots is link-retargeted."""
        exp = self.exp(BaselineEntry(self.PATH, FileKind.SYMLINK, "/srv/a", "/srv/a", "s"))
        obs = observe({self.PATH: link(self.PATH, "/srv/b", "/srv/b")}, scanned=(self.PATH,))
        assert kinds(obs, exp) == {(K.LINK_RETARGETED, "mine.service", self.PATH)}


class TestAuditUnits:
    def test_need_daemon_reload_is_stale(self) -> None:
        """NeedDaemonReload=yes opens stale-load on the fragment."""
        obs = observe(units=[replace(WEB_UNIT, need_daemon_reload=True)])
        assert kinds(obs) == {(K.STALE_LOAD, "web.service", WEB)}

    def test_hash_mismatch_is_stale_even_when_systemd_says_no(self) -> None:
        """A definition whose content changed since the last reload is stale despite NeedDaemonReload=no."""
        before = definition_hash(WEB_UNIT, observe().facts)
        retarget = {WEB: link(WEB, WEB_TARGET, WEB_STORE, "s-new")}
        assert kinds(observe(retarget, loaded_hashes={"web.service": before})) == {
            (K.STALE_LOAD, "web.service", WEB)
        }
        assert kinds(observe(loaded_hashes={"web.service": before})) == set()

    @pytest.mark.parametrize("state", ["error", "bad-setting"])
    def test_load_error(self, state: str) -> None:
        """A unit the manager could not load is a critical load-error."""
        findings = audit(observe(units=[replace(WEB_UNIT, load_state=state)]), EXPECT)
        assert [(f.kind, f.severity) for f in findings] == [(K.LOAD_ERROR, "critical")]

    def test_not_found_only_matters_when_expected(self) -> None:
        """not-found is normal for an optional dependency, drift for a unit Home Manager provides."""
        ghost = UnitRecord("ghost.service", load_state="not-found")
        assert kinds(observe(units=[WEB_UNIT, ghost])) == set()
        missing = replace(WEB_UNIT, load_state="not-found", fragment_path="", dropin_paths=())
        assert (K.LOAD_ERROR, "web.service", WEB) in kinds(observe(units=[missing]))

    def test_masked_expected_unit(self) -> None:
        """A masked unit that Home Manager provides is masked drift."""
        mask = f"{CONTROL}/web.service"
        unit = replace(WEB_UNIT, load_state="masked", fragment_path=mask, dropin_paths=())
        obs = observe({mask: link(mask, "/dev/null", "/dev/null", None)}, [unit], scanned=(mask,))
        assert kinds(obs) == {(K.MASKED, "web.service", mask)}

    def test_whole_directory_linked_by_home_manager(self) -> None:
        """``recursive = false``: the unit directory is one link into the store. Its files are
        root-owned regular files there; they are what Home Manager provides, not drift."""
        through = FileFact(
            WEB, FileKind.FILE, uid=0, mode=0o444, size=10, sha256="s-web", real_path=WEB_STORE
        )
        assert kinds(observe({WEB: through})) == set()
        # The same bytes in a real directory: the link was replaced (and the owner is foreign).
        copied = replace(through, real_path=None)
        assert kinds(observe({WEB: copied})) == {
            (K.LINK_REPLACED, "web.service", WEB),
            (K.FOREIGN_OWNER, "web.service", WEB),
        }
        # A directory linked outside the managed roots vouches for nothing.
        elsewhere = f"{CONFIG}/extra.service"
        outside = regular(elsewhere)
        outside = replace(outside, real_path="/srv/units/extra.service")
        assert kinds(observe({elsewhere: outside}, scanned=(elsewhere,))) == {
            (K.UNMANAGED_UNIT, "extra.service", elsewhere)
        }

    @pytest.mark.parametrize("empty", ["file", "link"])
    def test_empty_dropin_is_unmanaged_not_a_masked_unit(self, empty: str) -> None:
        """An empty or /dev/null drop-in masks same-named drop-ins only, never its unit.

        An editor's new drop-in is empty between create and write: it must not read as masked.
        """
        new = f"{CONFIG}/web.service.d/20-new.conf"
        fact = (
            regular(new, sha="s-empty", size=0)
            if empty == "file"
            else link(new, "/dev/null", "/dev/null", None)
        )
        unit = replace(WEB_UNIT, dropin_paths=(DROPIN, new))
        assert kinds(observe({new: fact}, [unit], scanned=(new,))) == {
            (K.UNMANAGED_DROPIN, "web.service", new)
        }

    def test_shadowed_by_higher_priority_fragment(self) -> None:
        """A higher-priority fragment that overrides the managed one is shadowed, not merely unmanaged."""
        admin = f"{CONTROL}/web.service"
        unit = replace(WEB_UNIT, fragment_path=admin)
        obs = observe({admin: regular(admin)}, [unit], scanned=(admin,))
        assert kinds(obs) == {(K.SHADOWED, "web.service", admin)}


DBUS = f"{VENDOR}/dbus.service"
DBUS_LINK = f"{VENDOR}/sockets.target.wants/dbus.socket"
PACKAGES = PackageIndex(
    "dpkg",
    "md5",
    frozenset({VENDOR}),
    frozen_map(
        {
            DBUS: PackagedFile(DBUS, ("dbus-user-session",), frozenset({"m-dbus"})),
            DBUS_LINK: PackagedFile(DBUS_LINK, ("dbus-user-session",)),
        }
    ),
    frozen_map({f"{VENDOR}/local.service": "/usr/lib/systemd/user/local.service.distrib"}),
)
WITH_PACKAGES = replace(EXPECT, packages=PACKAGES)


def vendor_file(path: str, md5: str | None = "m-dbus", **kw: object) -> FileFact:
    fact = regular(path, uid=0, **kw)  # type: ignore[arg-type]
    return replace(fact, md5=md5)


def vendor_obs(*facts: FileFact) -> Observation:
    """The clean Home Manager tree plus vendor files, scanned as the observer scans them."""
    base = {
        DBUS: vendor_file(DBUS),
        DBUS_LINK: link(DBUS_LINK, "../dbus.socket", f"{VENDOR}/dbus.socket"),
    }
    base.update({f.path: f for f in facts})
    return observe(
        base, scanned=tuple(p for p, f in base.items() if f.kind is not FileKind.MISSING)
    )


class TestAuditPackages:
    def test_files_as_their_packages_installed_them_are_clean(self) -> None:
        """A file with its package's MD5, and a packaged link (no MD5 recorded), are not drift."""
        assert audit(vendor_obs(), WITH_PACKAGES) == ()

    def test_modified_content_names_the_package_and_both_digests(self) -> None:
        """Other content than the package's is package-modified, critical, naming the package."""
        (finding,) = audit(vendor_obs(vendor_file(DBUS, md5="m-edited")), WITH_PACKAGES)
        assert finding.key == (K.PACKAGE_MODIFIED, "dbus.service", DBUS)
        assert finding.severity == "critical"
        assert finding.detail == (
            "differs from the file package dbus-user-session installed "
            "(md5 m-edited, dpkg recorded m-dbus)"
        )

    @pytest.mark.parametrize(
        ("fact", "detail"),
        [
            pytest.param(
                link(DBUS, "/etc/x.service", "/etc/x.service"),
                "a symlink to /etc/x.service where package dbus-user-session installed a "
                "regular file (dpkg)",
                id="replaced-by-a-link",
            ),
            pytest.param(
                FileFact(DBUS, FileKind.MISSING),
                "missing: package dbus-user-session installed it (dpkg)",
                id="missing",
            ),
        ],
    )
    def test_a_packaged_regular_file_that_is_no_longer_one(
        self, fact: FileFact, detail: str
    ) -> None:
        """A recorded MD5 means a regular file: a link there, or nothing, is a modification."""
        (finding,) = audit(vendor_obs(fact), WITH_PACKAGES)
        assert (finding.kind, finding.detail) == (K.PACKAGE_MODIFIED, detail)

    def test_a_packaged_name_the_manager_never_reads_is_vouched_by_ownership(self) -> None:
        """No hash was taken (not a unit name): its content cannot matter, its owner vouches."""
        index = replace(
            PACKAGES,
            files=frozen_map(
                {
                    **PACKAGES.files,
                    f"{VENDOR}/README": PackagedFile(f"{VENDOR}/README", ("x",), frozenset({"m"})),
                }
            ),
        )
        readme = replace(vendor_file(f"{VENDOR}/README", md5=None), sha256=None)
        assert audit(vendor_obs(readme), replace(EXPECT, packages=index)) == ()

    def test_a_packaged_file_too_large_to_read_is_not_vouched_for(self) -> None:
        """Content not read (over the cap) cannot match the package's checksum; the detail says why."""
        big = replace(vendor_file(DBUS, md5=None), sha256=None, error="too large to hash")
        (finding,) = audit(vendor_obs(big), WITH_PACKAGES)
        assert finding.kind is K.PACKAGE_MODIFIED
        assert "(md5 unreadable: too large to hash, dpkg recorded m-dbus)" in finding.detail

    def test_a_file_no_package_owns_is_unowned(self) -> None:
        """A file the database does not list is package-unowned, a warning."""
        stray = f"{VENDOR}/stray.service"
        (finding,) = audit(vendor_obs(vendor_file(stray, md5=None)), WITH_PACKAGES)
        assert (finding.key, finding.severity) == (
            (K.PACKAGE_UNOWNED, "stray.service", stray),
            "warning",
        )
        assert finding.detail == "no package owns this vendor-tier file (not in the dpkg database)"

    def test_an_unowned_file_in_place_of_a_diverted_one_says_where_that_went(self) -> None:
        """A diversion moved the packaged file away: the unowned one names the new place."""
        local = f"{VENDOR}/local.service"
        (finding,) = audit(vendor_obs(vendor_file(local, md5=None)), WITH_PACKAGES)
        assert finding.detail.endswith(
            "; it diverts the packaged file to /usr/lib/systemd/user/local.service.distrib"
        )

    def test_a_group_writable_vendor_file_is_unsafe_as_well(self) -> None:
        """Ownership and mode rules still apply to packaged files (root-owned is fine there)."""
        found = kinds(vendor_obs(vendor_file(DBUS, mode=0o664)), WITH_PACKAGES)
        assert found == {(K.UNSAFE_MODE, "dbus.service", DBUS)}

    def test_without_a_database_the_vendor_tier_is_trusted_as_before(self) -> None:
        """No package index: an edited or stray vendor file is not judged at all."""
        obs = vendor_obs(vendor_file(DBUS, md5="m-edited"), vendor_file(f"{VENDOR}/x.service"))
        assert audit(obs, EXPECT) == ()

    def test_a_vendor_directory_the_index_does_not_cover_is_trusted(self) -> None:
        """Only the index's directories are judged (never /usr/local, which no package owns)."""
        uncovered = replace(PACKAGES, dirs=frozenset())
        obs = vendor_obs(vendor_file(f"{VENDOR}/x.service", md5=None))
        assert audit(obs, replace(EXPECT, packages=uncovered)) == ()

    def test_a_sha256_database_compares_the_sha256(self) -> None:
        """A database that records SHA-256 is checked against the fact's own hash, no MD5 needed."""
        index = replace(
            PACKAGES,
            digest="sha256",
            files=frozen_map({DBUS: PackagedFile(DBUS, ("dbus",), frozenset({"s-dbus"}))}),
        )
        exp = replace(EXPECT, packages=index)
        obs = vendor_obs(vendor_file(DBUS, md5=None, sha="s-dbus"))
        assert {f.kind for f in audit(obs, exp)} == {K.PACKAGE_UNOWNED}  # only the link

    def test_show_names_the_package_in_the_owner_column(self) -> None:
        """show's owner is ``package:<name>`` when intact, and names the package when not."""
        unit = UnitRecord("dbus.service", fragment_path=DBUS, dropin_paths=(DBUS_LINK,))
        intact = provenance_of(unit, vendor_obs(), WITH_PACKAGES)
        assert intact.fragment is not None
        assert (intact.fragment.owner, intact.fragment.owner_label) == (
            Owner.PACKAGE,
            "package:dbus-user-session",
        )
        edited = provenance_of(unit, vendor_obs(vendor_file(DBUS, md5="m-x")), WITH_PACKAGES)
        assert edited.fragment is not None
        assert edited.fragment.owner_label == "none (dbus-user-session, modified)"
        assert edited.to_json()["fragment"]["package"] == "dbus-user-session"  # type: ignore[index]


class TestDescribe:
    def test_describe_names_owner_and_tier(self) -> None:
        """show's rows carry tier, kind, target and who vouches for each file."""
        vendor = f"{VENDOR}/web.service.d/vendor.conf"
        unit = replace(WEB_UNIT, dropin_paths=(DROPIN, vendor))
        obs = observe({vendor: regular(vendor, uid=0)}, [unit])
        shown = provenance_of(unit, obs, EXPECT).to_json()
        assert shown["fragment"] == {
            "path": WEB,
            "tier": "config",
            "kind": "symlink",
            "target": WEB_TARGET,
            "owner": "home-manager",
            "package": None,
            "sha256": "s-web",
        }
        assert [(d["tier"], d["owner"]) for d in shown["dropins"]] == [  # type: ignore[attr-defined]
            ("config", "home-manager"),
            ("vendor", "system"),
        ]


class TestHelpers:
    @pytest.mark.parametrize(
        ("target", "expected"),
        [
            (f"{FILES}/.config/systemd/user/a", FILES),
            ("/nix/store/x-a.service", None),
            (None, None),
        ],
    )
    def test_home_manager_files_dir(self, target: str | None, expected: str | None) -> None:
        """The generation's files directory is recognised inside a link target."""
        assert home_manager_files_dir(target) == expected

    def test_vouch_none_for_unknown_file(self) -> None:
        """A file nothing knows about has no owner."""
        assert vouch("/x", regular("/x"), EXPECT) is Owner.NONE

"""Hypothesis against the pure parts hostile input reaches: unit names, signals, the audit core."""

from __future__ import annotations

import os
import random
import string
from collections.abc import Callable, Mapping
from dataclasses import fields, replace
from typing import Any

from dbus_fast import Message, MessageType, Variant
from hypothesis import given, settings
from hypothesis import strategies as st

from provenanced.core.audit import audit, definition_hash
from provenanced.core.incremental import IncrementalAudit
from provenanced.core.state import AuditState, Reading, Touched
from provenanced.core.unitpath import AUDITED_TIERS, locate
from provenanced.model import (
    BaselineEntry,
    Expectations,
    ExpectedLink,
    FileFact,
    FileKind,
    Finding,
    FindingKind,
    HomeManagerGeneration,
    Observation,
    PackagedFile,
    PackageIndex,
    Tier,
    UnitDir,
    UnitRecord,
    frozen_map,
)
from provenanced.systemd.events import (
    DBUS_NAME,
    DBUS_PATH,
    MANAGER_IFACE,
    MANAGER_PATH,
    PROPERTIES_IFACE,
    SYSTEMD_NAME,
    JobNew,
    JobRemoved,
    ManagerEvent,
    ManagerOwnerChanged,
    PropertiesChanged,
    Reloading,
    UnitFilesChanged,
    UnitNew,
    UnitRemoved,
    decode_signal,
)
from provenanced.systemd.names import (
    UNIT_PATH_PREFIX,
    UNIT_TYPES,
    bus_label_unescape,
    dropin_dirs_for,
    is_valid_unit_name,
    template_of,
    unescape_unit_path,
    unit_object_path,
    unit_suffix,
)

# --- unit names ------------------------------------------------------------------------------

# What systemd-escape produces ("\x2d" for a dash in a path, "\x20" for a space), mixed with
# ordinary name characters, so generated names look like the escaped ones found in the wild.
_ESCAPES = st.sampled_from(["\\x2d", "\\x20", "\\x2f", "\\xc3\\xa9", "-", "_", ".", ":", "@"])
_PLAIN = st.text(string.ascii_letters + string.digits, min_size=1, max_size=8)
escaped_names = st.builds(
    lambda parts, kind: "".join(parts) + "." + kind,
    st.lists(st.one_of(_PLAIN, _ESCAPES), min_size=1, max_size=8),
    st.sampled_from(sorted(UNIT_TYPES)),
)
# Names as they arrive from disk: any text, including bytes that are not UTF-8.
disk_names = st.one_of(st.text(), st.binary(max_size=64).map(os.fsdecode), escaped_names)


class TestUnitNameDecoding:
    @given(st.text())
    def test_unescape_unit_path_only_raises_value_error(self, path: str) -> None:
        """Any object path decodes to a name or is refused with ValueError, nothing else."""
        for candidate in (path, UNIT_PATH_PREFIX + path):
            try:
                name = unescape_unit_path(candidate)
            except ValueError:
                continue
            assert isinstance(name, str)

    @given(st.text())
    def test_label_unescape_is_total(self, label: str) -> None:
        """Unescaping never fails, whatever underscores and hex digits the label holds."""
        assert isinstance(bus_label_unescape(label), str)

    @given(disk_names)
    def test_any_file_name_round_trips_through_its_object_path(self, name: str) -> None:
        """Escapes, templates, spaces, unicode and undecodable bytes all survive the bus path."""
        assert unescape_unit_path(unit_object_path(name)) == name

    @given(disk_names)
    def test_validity_is_total_and_consistent(self, name: str) -> None:
        """is_valid_unit_name never raises; a valid name has a type, drop-in dirs and a template."""
        if not is_valid_unit_name(name):
            return
        assert unit_suffix(name) in UNIT_TYPES
        assert dropin_dirs_for(name)[-1] == f"{name}.d"
        template = template_of(name)
        assert template is None or (is_valid_unit_name(template) and "@." in template)

    @given(escaped_names)
    def test_systemd_escaped_names_are_valid(self, name: str) -> None:
        """Names built from systemd-escape output are valid unless they start with '@' or get too long."""
        if name.startswith("@") or len(name) > 255:
            return
        assert is_valid_unit_name(name)


# --- manager signals -------------------------------------------------------------------------

_BODIES: dict[str, st.SearchStrategy[list[Any]]] = {
    "so": st.tuples(st.text(), st.text()).map(list),
    "uos": st.tuples(st.integers(0, 2**32 - 1), st.text(), st.text()).map(list),
    "uoss": st.tuples(st.integers(0, 2**32 - 1), st.text(), st.text(), st.text()).map(list),
    "b": st.tuples(st.booleans()).map(list),
    "": st.just([]),
    "s": st.tuples(st.text()).map(list),
    "sss": st.tuples(st.one_of(st.just(SYSTEMD_NAME), st.text()), st.text(), st.text()).map(list),
    "sa{sv}as": st.tuples(
        st.text(),
        st.dictionaries(st.text(max_size=8), st.text().map(lambda v: Variant("s", v)), max_size=3),
        st.lists(st.text(), max_size=3),
    ).map(list),
}
# The signals the daemon uses, as org.freedesktop.systemd1(5) and the D-Bus specification
# define them: member → (interface, an object path it is sent from, signature, event).
_DOCUMENTED: dict[str, tuple[str, str, str, type[ManagerEvent]]] = {
    "UnitNew": (MANAGER_IFACE, MANAGER_PATH, "so", UnitNew),
    "UnitRemoved": (MANAGER_IFACE, MANAGER_PATH, "so", UnitRemoved),
    "JobNew": (MANAGER_IFACE, MANAGER_PATH, "uos", JobNew),
    "JobRemoved": (MANAGER_IFACE, MANAGER_PATH, "uoss", JobRemoved),
    "Reloading": (MANAGER_IFACE, MANAGER_PATH, "b", Reloading),
    "UnitFilesChanged": (MANAGER_IFACE, MANAGER_PATH, "", UnitFilesChanged),
    "PropertiesChanged": (
        PROPERTIES_IFACE,
        f"{MANAGER_PATH}/unit/x",
        "sa{sv}as",
        PropertiesChanged,
    ),
    "NameOwnerChanged": (DBUS_NAME, DBUS_PATH, "sss", ManagerOwnerChanged),
}
_INTERFACES = [MANAGER_IFACE, PROPERTIES_IFACE, DBUS_NAME, "a.b"]
_PATHS = [MANAGER_PATH, f"{MANAGER_PATH}/unit/x", f"{MANAGER_PATH}x", DBUS_PATH, "/x"]


def _other(values: list[str], than: str) -> st.SearchStrategy[str]:
    return st.sampled_from([value for value in values if value != than])


@st.composite
def signals(draw: st.DrawFn) -> tuple[Message, bool]:
    """A signal, and whether it is sent exactly as documented (about the manager's own name).

    Some are documented, some differ from a documented signal in one part, some are random.
    """
    member = draw(st.sampled_from([*_DOCUMENTED, "Other"]))
    parts = ["interface", "path", "signature"]
    if member == "NameOwnerChanged":
        parts += ["sender", "name"]
    # "documented", the one part that differs from the documented signal, or "random".
    altered = draw(st.sampled_from(["documented", *parts, "random"]))
    if altered == "random" or member not in _DOCUMENTED:
        altered = "random"
        interface = draw(st.sampled_from(_INTERFACES))
        path = draw(st.sampled_from(_PATHS))
        signature = draw(st.sampled_from(sorted(_BODIES)))
    else:
        interface, path, signature, _ = _DOCUMENTED[member]
    if altered == "interface":
        interface = draw(_other(_INTERFACES, interface))
    elif altered == "path":
        path = draw(_other(_PATHS, path))
    elif altered == "signature":
        signature = draw(_other(sorted(_BODIES), signature))
    body = draw(_BODIES[signature])
    sender = draw(st.sampled_from([DBUS_NAME, ":1.1", None]))
    if altered != "random" and member == "NameOwnerChanged" and signature == "sss":
        # Only the bus itself announces owners, and only the manager's name concerns us.
        sender = draw(st.sampled_from([":1.1", None])) if altered == "sender" else DBUS_NAME
        body[0] = (
            draw(st.sampled_from(["org.example.Web", ""])) if altered == "name" else SYSTEMD_NAME
        )
    message = Message(
        message_type=MessageType.SIGNAL,
        path=path,
        interface=interface,
        member=member,
        sender=sender,
        signature=signature,
        body=body,
    )
    return message, altered == "documented"


def _sent_from_the_manager(msg: Message) -> bool:
    """Sent by the object the documentation names: the manager, one of its units or jobs, or the
    bus itself for owner changes."""
    path = msg.path or ""
    if msg.member == "PropertiesChanged":
        return path == MANAGER_PATH or path.startswith(MANAGER_PATH + "/")
    if msg.member == "NameOwnerChanged":
        return (path, msg.sender) == (DBUS_PATH, DBUS_NAME)
    return path == MANAGER_PATH


def _holds_body(event: ManagerEvent, msg: Message) -> bool:
    """Whether ``event`` carries exactly what the signal said, Variants unwrapped."""
    if isinstance(event, PropertiesChanged):
        interface, changed, invalidated = msg.body
        unwrapped = {key: value.value for key, value in changed.items()}
        return (event.unit_path, event.interface, dict(event.changed), event.invalidated) == (
            msg.path,
            interface,
            unwrapped,
            tuple(invalidated),
        )
    if isinstance(event, ManagerOwnerChanged):
        return bool(msg.body[0] == SYSTEMD_NAME and event.new_owner == msg.body[2])
    return bool([getattr(event, field.name) for field in fields(event)] == msg.body)


class TestSignalDecoding:
    @settings(max_examples=1000, deadline=None)
    @given(signals())
    def test_decodes_only_what_the_signal_says(self, signal: tuple[Message, bool]) -> None:
        """A signal decodes to None, or to the event its member names when the manager sent it as
        documented, holding its body; a documented one always decodes; nothing ever raises."""
        msg, documented = signal
        event = decode_signal(msg)
        if documented:
            assert event is not None
        if event is not None:
            interface, _, signature, kind = _DOCUMENTED[msg.member or ""]
            assert (type(event), msg.interface, msg.signature) == (kind, interface, signature)
            assert _sent_from_the_manager(msg)
            assert _holds_body(event, msg)


# --- the audit core --------------------------------------------------------------------------

UID = 1000
HOME = "/home/u"
DIRS = (
    UnitDir(f"{HOME}/.config/systemd/user.control", Tier.CONTROL, 0),
    UnitDir(f"{HOME}/.config/systemd/user", Tier.CONFIG, 1),
    UnitDir("/etc/systemd/user", Tier.ADMIN, 2),
    UnitDir("/srv/units", Tier.CUSTOM, 3),
    UnitDir("/usr/lib/systemd/user", Tier.VENDOR, 4),
)
FILES = "/nix/store/aaaa-home-manager-files"
OLD_FILES = "/nix/store/0000-home-manager-files"
_NAMES = ["web.service", "db.service", "tpl@.service", "tpl@x.service", "a b.service", "é.timer"]
_RELATIVE = [*_NAMES, "web.service.d/10-env.conf", "default.target.wants/web.service"]
PATHS = [f"{d.path}/{rel}" for d in DIRS for rel in _RELATIVE] + ["/elsewhere/web.service", ""]
TARGETS = [
    None,
    "/dev/null",
    f"{FILES}/.config/systemd/user/web.service",
    f"{OLD_FILES}/.config/systemd/user/web.service",
    "/nix/store/bbbb-web.service",
    "/tmp/outside.service",
    "web.service",
    "../../etc/passwd",
]
SHAS = st.sampled_from([None, "s1", "s2", ""])
paths = st.sampled_from(PATHS)
targets = st.sampled_from(TARGETS)

facts = st.builds(
    FileFact,
    path=paths,
    kind=st.sampled_from(list(FileKind)),
    target=targets,
    resolved=targets,
    uid=st.sampled_from([None, UID, 0]),
    mode=st.sampled_from([None, 0o644, 0o666, 0o620, 0o444]),
    size=st.sampled_from([None, 0, 10]),
    sha256=SHAS,
    md5=SHAS,
    mtime_ns=st.sampled_from([None, 1]),
    inode=st.sampled_from([None, 1, 2]),
    error=st.sampled_from([None, "Permission denied", "Too many levels of symbolic links"]),
    real_path=st.sampled_from([None, "/nix/store/bbbb-web.service", "/tmp/outside.service"]),
)
units = st.builds(
    UnitRecord,
    name=st.sampled_from([*_NAMES, "bad name", ""]),
    load_state=st.sampled_from(["loaded", "not-found", "error", "bad-setting", "masked", "x"]),
    fragment_path=paths,
    dropin_paths=st.lists(paths, max_size=3).map(tuple),
    need_daemon_reload=st.booleans(),
)
expected_links = st.builds(
    ExpectedLink, path=paths, target=targets.map(str), resolved=targets, sha256=SHAS
)
VENDOR = DIRS[4].path
packaged_files = st.builds(
    PackagedFile,
    path=st.sampled_from([p for p in PATHS if p.startswith(VENDOR + "/")]),
    packages=st.sampled_from([("systemd",), ("a", "b:amd64")]),
    digests=st.frozensets(st.sampled_from(["s1", "s2"]), max_size=2),
)
package_indexes = st.one_of(
    st.none(),
    st.builds(
        PackageIndex,
        manager=st.just("dpkg"),
        digest=st.sampled_from(["md5", "sha256"]),
        dirs=st.sampled_from([frozenset({VENDOR}), frozenset()]),
        files=st.lists(packaged_files, max_size=4).map(
            lambda fs: frozen_map({f.path: f for f in fs})
        ),
        diverted=st.sampled_from([frozen_map({}), frozen_map({f"{VENDOR}/web.service": "/x"})]),
    ),
)
baseline_entries = st.builds(
    BaselineEntry,
    path=paths,
    kind=st.sampled_from(list(FileKind)),
    target=targets,
    resolved=targets,
    sha256=SHAS,
)


@st.composite
def cases(draw: st.DrawFn) -> tuple[Observation, Expectations]:
    fact_list = draw(st.lists(facts, max_size=12))
    unit_list = draw(st.lists(units, max_size=5))
    hashes = draw(
        st.one_of(
            st.none(),
            st.dictionaries(st.sampled_from(_NAMES), st.sampled_from(["h1", "h2"]), max_size=3),
        )
    )
    obs = Observation(
        units=frozen_map({u.name: u for u in unit_list}),
        facts=frozen_map({f.path: f for f in fact_list}),
        unit_dirs=DIRS,
        uid=UID,
        scanned_files=frozenset(draw(st.lists(paths, max_size=8))),
        loaded_hashes=hashes,
    )
    exp = Expectations(
        managed_roots=draw(st.sampled_from([("/nix/store",), (), ("/nix/store", "/tmp")])),
        home_manager_generation=draw(st.sampled_from([None, "/nix/store/gggg-generation"])),
        home_manager_files=draw(st.sampled_from([None, FILES, OLD_FILES])),
        home_manager_links=frozen_map(
            {e.path: e for e in draw(st.lists(expected_links, max_size=6))}
        ),
        baseline=frozen_map({e.path: e for e in draw(st.lists(baseline_entries, max_size=6))}),
        packages=draw(package_indexes),
    )
    return obs, exp


# Kinds judged per file: their path is always a file in an audited directory.
_PATH_KINDS = frozenset(
    {
        FindingKind.LINK_REPLACED,
        FindingKind.LINK_RETARGETED,
        FindingKind.LINK_DANGLING,
        FindingKind.MANAGED_MISSING,
        FindingKind.ORPHAN_LINK,
        FindingKind.UNMANAGED_UNIT,
        FindingKind.UNMANAGED_DROPIN,
        FindingKind.FOREIGN_OWNER,
        FindingKind.UNSAFE_MODE,
    }
)
# Kinds only the package database gives: their path is in a directory the index covers.
_PACKAGE_KINDS = frozenset({FindingKind.PACKAGE_MODIFIED, FindingKind.PACKAGE_UNOWNED})


def _known_paths(obs: Observation, exp: Expectations) -> set[str]:
    known = {*obs.facts, *obs.scanned_files, *exp.home_manager_links, *exp.baseline}
    known.update(exp.packages.files if exp.packages is not None else ())
    for unit in obs.units.values():
        known.add(unit.fragment_path)
        known.update(unit.dropin_paths)
    return known


def _shuffled(obs: Observation, exp: Expectations, seed: int) -> tuple[Observation, Expectations]:
    def mix(mapping: Any) -> Any:
        items = list(mapping.items())
        random.Random(seed).shuffle(items)
        return frozen_map(dict(items))

    scanned = list(obs.scanned_files)
    random.Random(seed).shuffle(scanned)
    return (
        Observation(
            units=mix(obs.units),
            facts=mix(obs.facts),
            unit_dirs=obs.unit_dirs,
            uid=obs.uid,
            scanned_files=frozenset(scanned),
            loaded_hashes=obs.loaded_hashes,
        ),
        Expectations(
            managed_roots=exp.managed_roots,
            home_manager_generation=exp.home_manager_generation,
            home_manager_files=exp.home_manager_files,
            home_manager_links=mix(exp.home_manager_links),
            baseline=mix(exp.baseline),
            packages=exp.packages and replace(exp.packages, files=mix(exp.packages.files)),
        ),
    )


class TestAuditCore:
    @settings(max_examples=400, deadline=None)
    @given(cases(), st.integers(0, 2**16))
    def test_total_sorted_unique_and_grounded(
        self, case: tuple[Observation, Expectations], seed: int
    ) -> None:
        """Never raises; sorted, no duplicate identity; every path observed, expected or in the baseline."""
        obs, exp = case
        found = audit(obs, exp)
        assert isinstance(found, tuple) and all(isinstance(f, Finding) for f in found)
        assert list(found) == sorted(found, key=lambda f: (f.unit, f.kind.value, f.path))
        assert len({f.key for f in found}) == len(found)
        known = _known_paths(obs, exp)
        dirs = {d.path: d for d in DIRS}
        for finding in found:
            assert finding.path in known, finding
            assert finding.severity in ("critical", "warning", "info")
            assert finding.detail
            loc = locate(finding.path, dirs)
            packaged = exp.packages.dirs if exp.packages is not None else frozenset()
            if finding.kind in _PACKAGE_KINDS:
                assert loc is not None and loc.unit_dir.path in packaged, finding
            elif finding.kind in _PATH_KINDS:
                in_packaged = loc is not None and loc.unit_dir.path in packaged
                assert loc is not None and (loc.unit_dir.tier in AUDITED_TIERS or in_packaged)
        # The order of the inputs does not matter: the same findings, in the same order.
        assert audit(*_shuffled(obs, exp, seed)) == found


@st.composite
def changed(draw: st.DrawFn, obs: Observation) -> Observation:
    """``obs`` after a few files, units, scans and loaded hashes changed."""

    def edit(mapping: Mapping[str, Any], new: list[Any], key: Callable[[Any], str]) -> Any:
        result = {k: v for k, v in mapping.items() if not draw(st.booleans()) or len(mapping) < 2}
        result.update((key(item), item) for item in new)
        return frozen_map(result)

    hashes = obs.loaded_hashes
    if hashes is not None and draw(st.booleans()):
        # Some units loaded as they are on disk now, so that a later file change makes them stale.
        current = {u.name: definition_hash(u, obs.facts) for u in obs.units.values()}
        extra = draw(st.dictionaries(st.sampled_from(_NAMES), st.sampled_from(["h1", "h3"])))
        hashes = frozen_map({**hashes, **extra, **current})
    return Observation(
        units=edit(obs.units, draw(st.lists(units, max_size=2)), lambda u: u.name),
        facts=edit(obs.facts, draw(st.lists(facts, max_size=4)), lambda f: f.path),
        unit_dirs=obs.unit_dirs,
        uid=obs.uid,
        scanned_files=obs.scanned_files ^ frozenset(draw(st.lists(paths, max_size=3))),
        loaded_hashes=hashes,
    )


class TestIncrementalAudit:
    @settings(max_examples=400, deadline=None)
    @given(st.data())
    def test_updates_equal_a_full_audit(self, data: st.DataObject) -> None:
        """After any run of changes, re-judging only what changed gives exactly the full audit."""
        obs, exp = data.draw(cases())
        kept = IncrementalAudit(obs, exp)
        assert kept.findings == audit(obs, exp)
        for _ in range(data.draw(st.integers(1, 3))):
            new = data.draw(changed(obs))
            touched = Touched.between(obs, new)
            assert kept.fits(new, exp)
            assert kept.update(new, touched.paths, touched.units) == audit(new, exp)
            obs = new

    @settings(max_examples=200, deadline=None)
    @given(st.data())
    def test_full_rereads_judged_by_what_differs_equal_a_full_audit(
        self, data: st.DataObject
    ) -> None:
        """A state fed full re-reads (the audit kept, only what differs judged) opens exactly
        what a full audit of its observation finds."""
        obs, exp = data.draw(cases())
        state, generation = AuditState(exp.managed_roots), HomeManagerGeneration()
        for now in range(data.draw(st.integers(2, 4))):
            reloaded = data.draw(st.booleans())
            state.update(Reading(obs, None, generation, reloaded), float(now))
            seen = state.observation
            assert seen is not None
            assert set(state.findings) == {f.key for f in audit(seen, state.expectations)}
            obs = data.draw(changed(obs))

    def test_a_managed_fragment_that_goes_ends_the_shadow(self) -> None:
        """The unit whose managed fragment changed is judged again, though nothing names the path."""
        here = f"{DIRS[0].path}/web.service"
        managed = f"{DIRS[1].path}/web.service"
        target = f"{FILES}/.config/systemd/user/web.service"
        exp = Expectations(
            home_manager_files=FILES,
            home_manager_links=frozen_map({managed: ExpectedLink(managed, target, target, "s2")}),
        )
        link = FileFact(managed, FileKind.SYMLINK, target=target, resolved=target)
        obs = Observation(
            units=frozen_map({"web.service": UnitRecord("web.service", fragment_path=here)}),
            facts=frozen_map({here: FileFact(here, FileKind.FILE, sha256="s1"), managed: link}),
            unit_dirs=DIRS,
            uid=UID,
            scanned_files=frozenset({here, managed}),
        )
        kept = IncrementalAudit(obs, exp)
        assert FindingKind.SHADOWED in {f.kind for f in kept.findings}
        gone = replace(
            obs,
            facts=frozen_map({here: obs.facts[here]}),
            scanned_files=frozenset({here}),
        )
        assert kept.update(gone, {managed}, ()) == audit(gone, exp)
        assert FindingKind.SHADOWED not in {f.kind for f in kept.findings}

    def test_other_expectations_need_a_new_audit(self) -> None:
        """An audit cannot follow a new generation or baseline by updates."""
        obs = Observation(units=frozen_map({}), facts=frozen_map({}), unit_dirs=DIRS, uid=UID)
        exp = Expectations(managed_roots=("/nix/store",))
        kept = IncrementalAudit(obs, exp)
        assert kept.fits(obs, exp)
        assert not kept.fits(obs, replace(exp, baseline=frozen_map({})))
        assert not kept.fits(replace(obs, unit_dirs=DIRS[:2]), exp)

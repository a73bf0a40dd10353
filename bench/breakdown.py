"""Where a full resync's time goes, stage by stage, timed in-process with the daemon's own code.

Each stage calls the same functions `Observer.observe()` and the engine call, one at a time, so a
stage's figure is its own cost (warm caches, as in the daemon's second and later resyncs). Next
to the stages that dominate, a prototype of the suggested fix runs on the same input: those
rows are the evidence behind the optimisations docs/performance.md proposes. Nothing here is
imported by the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import posixpath
import stat
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

from bench.proc import sample
from bench.stats import median, ms
from provenanced.errors import ProvenancedError
from provenanced.sandbox import Sandbox

_REPEATS = 3
# What provenance needs per unit beyond ListUnits' states. GetAll also makes the manager compute
# every other property, UnitFileState among them (a unit-file lookup on disk per unit).
_PROVENANCE_KEYS = ("FragmentPath", "DropInPaths", "SourcePath", "NeedDaemonReload")


@dataclass(frozen=True, slots=True)
class Stage:
    """One timed stage: median seconds of a few repeats, and how many items it handled."""

    name: str
    seconds: float
    items: int | None = None
    note: str = ""


async def _timed(fn: Callable[[], Awaitable[Any]], repeats: int = _REPEATS) -> tuple[float, Any]:
    times, value = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        value = await fn()
        times.append(time.perf_counter() - started)
    return median(times), value


def _baseline(sandbox: Sandbox) -> dict[str, Any]:
    """The baseline the daemon recorded on its first start, so the audit sees the same tree."""
    from provenanced.expect import baseline

    try:
        return dict(baseline.load_baseline(str(sandbox.state_dir)) or {})
    except ProvenancedError:
        return {}


def _sync(fn: Callable[[], Any]) -> Callable[[], Awaitable[Any]]:
    async def run() -> Any:
        return fn()

    return run


def kernel_realpath(path: str) -> tuple[str, os.stat_result]:
    """Resolve a path the way open(2) does: one O_PATH open, the kernel's name, one fstat."""
    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        return os.readlink(f"/proc/self/fd/{fd}"), os.fstat(fd)
    finally:
        os.close(fd)


_ORIGINAL_REALPATH = posixpath.realpath


def _fast_realpath(path: str, *, strict: bool = False) -> str:
    try:
        return kernel_realpath(path)[0]
    except OSError:
        if strict:
            raise
        return _ORIGINAL_REALPATH(path)


@contextlib.contextmanager
def _fast_paths() -> Iterator[None]:
    """Swap in the realpath prototype for the length of one measurement, in this process only."""
    posixpath.realpath = _fast_realpath
    try:
        yield
    finally:
        posixpath.realpath = _ORIGINAL_REALPATH


async def breakdown(sandbox: Sandbox) -> list[Stage]:
    """Time every stage of a full resync against this sandbox's manager."""
    from provenanced.core.audit import audit, definition_hash
    from provenanced.core.vouching import expectations
    from provenanced.daemon.observer import Observer, scan_files, user_dirs
    from provenanced.expect.generation import read_generation
    from provenanced.model import frozen_map
    from provenanced.systemd import manager
    from provenanced.systemd.bus import ManagerConnection, resolve_address

    env = sandbox.env
    conn = await ManagerConnection.connect(resolve_address(None, env))
    stages: list[Stage] = []
    try:
        roots = (str(sandbox.store),)
        observer = Observer(conn, user_dirs(env), roots)
        await observer.observe()  # warm the hash cache as a running daemon has it
        total, (obs, generation) = await _timed(observer.observe)
        exp = expectations(roots, generation, _baseline(sandbox) or {})
        audit_s, findings = await _timed(_sync(lambda: audit(obs, exp)))
        stages.append(Stage("observe() + audit(): a full resync's core", total + audit_s))

        unit_dirs_s, unit_dirs = await _timed(observer.unit_dirs)
        stages.append(Stage("  UnitPath (1 D-Bus Get)", unit_dirs_s))
        home = env["HOME"]
        gen_s, gen = await _timed(_sync(lambda: read_generation(home, unit_dirs, observer.reader)))
        stages.append(Stage("  Home Manager links (read_generation)", gen_s, len(gen.links)))
        scan_s, scanned = await _timed(_sync(lambda: scan_files(unit_dirs)))
        stages.append(Stage("  scan unit directories", scan_s, len(scanned)))
        list_s, summaries = await _timed(lambda: manager.list_units(conn))
        stages.append(Stage("  ListUnits (1 D-Bus call)", list_s, len(summaries)))
        names = sorted(obs.units)
        records_s, records = await _timed(lambda: manager.get_unit_records(conn, names))
        stages.append(Stage("  unit records (GetAll per unit, decoded)", records_s, len(records)))
        facts_s, facts = await _timed(
            lambda: observer.read_facts(records.values(), scanned, gen.links)
        )
        stages.append(Stage("  file facts (lstat, readlink, realpath, hash)", facts_s, len(facts)))
        stages.append(Stage("  audit()", audit_s, len(findings)))
        hash_s, _ = await _timed(
            _sync(lambda: [definition_hash(u, obs.facts) for u in obs.units.values()])
        )
        stages.append(Stage("  definition hashes (engine)", hash_s, len(obs.units)))

        with _fast_paths():
            fixed_s, (fixed_obs, fixed_gen) = await _timed(observer.observe)
            fixed_exp = expectations(roots, fixed_gen, exp.baseline)
            fixed_audit_s, fixed_findings = await _timed(_sync(lambda: audit(fixed_obs, fixed_exp)))
        same = fixed_findings == findings and fixed_obs.facts == obs.facts
        stages.append(
            Stage(
                "prototype: the same with the O_PATH realpath",
                fixed_s + fixed_audit_s,
                None,
                f"audit() {ms(fixed_audit_s)}; same facts and findings: {'yes' if same else 'NO'}",
            )
        )
        stages += await _dbus_prototypes(conn, names, records_s, sandbox.manager_pid)
        stages += _fact_prototypes(list(facts), obs)
        stages += _audit_prototypes(obs, exp, audit_s, frozen_map)
        stages.append(_rejudged(obs, fixed_obs, exp, audit_s))
    finally:
        await conn.close()
    return stages


def _cpu_split(manager_pid: int, fn: Callable[[], Awaitable[Any]]) -> Callable[[], Awaitable[str]]:
    """Run ``fn`` once and say how much CPU we and the manager spent on it."""

    async def run() -> str:
        ours, theirs = time.process_time(), sample(manager_pid).cpu_seconds
        await fn()
        ours, theirs = time.process_time() - ours, sample(manager_pid).cpu_seconds - theirs
        return f"CPU: ours {ms(ours)}, manager {ms(theirs)}"

    return run


async def _dbus_prototypes(
    conn: Any, names: list[str], decoded: float, manager_pid: int
) -> list[Stage]:
    from provenanced.systemd.bus import PROPERTIES_IFACE
    from provenanced.systemd.names import unit_object_path

    async def raw() -> list[Any]:
        return list(
            await asyncio.gather(
                *(
                    conn.call(
                        "GetAll",
                        "s",
                        ["org.freedesktop.systemd1.Unit"],
                        interface=PROPERTIES_IFACE,
                        path=unit_object_path(n),
                    )
                    for n in names
                )
            )
        )

    raw_s, _ = await _timed(raw)
    raw_cpu = await _cpu_split(manager_pid, raw)()

    async def gets() -> list[Any]:
        # ListUnits already carries LoadState/ActiveState/SubState for every unit.
        return list(
            await asyncio.gather(
                *(
                    conn.call(
                        "Get",
                        "ss",
                        ["org.freedesktop.systemd1.Unit", prop],
                        interface=PROPERTIES_IFACE,
                        path=unit_object_path(n),
                    )
                    for n in names
                    for prop in _PROVENANCE_KEYS
                )
            )
        )

    gets_s, _ = await _timed(gets)
    gets_cpu = await _cpu_split(manager_pid, gets)()
    return [
        Stage(
            "  of which GetAll round trips alone (no record building)",
            raw_s,
            len(names),
            f"vs {ms(decoded)} with records; {raw_cpu}",
        ),
        Stage(
            f"  prototype: {len(_PROVENANCE_KEYS)} Gets per unit instead of GetAll",
            gets_s,
            len(names) * len(_PROVENANCE_KEYS),
            f"{', '.join(_PROVENANCE_KEYS)}; {gets_cpu}",
        ),
    ]


def _fact_prototypes(paths: list[str], obs: Any) -> list[Stage]:
    links = [p for p in paths if os.path.islink(p)]

    def python_realpath() -> None:
        for p in links:
            with_stat = os.path.realpath(p, strict=True)
            os.stat(with_stat)

    def kernel() -> None:
        for p in links:
            kernel_realpath(p)

    def lstat_only() -> None:
        for p in paths:
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                os.readlink(p)

    times = {}
    for name, fn in (("python", python_realpath), ("kernel", kernel), ("lstat", lstat_only)):
        runs = []
        for _ in range(_REPEATS):
            started = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - started)
        times[name] = median(runs)
    return [
        Stage(
            "  of which realpath()+stat of every link (pure Python)", times["python"], len(links)
        ),
        Stage(
            "  prototype: O_PATH open + /proc/self/fd readlink + fstat",
            times["kernel"],
            len(links),
            "same resolved path and stat",
        ),
        Stage("  of which lstat+readlink of every path", times["lstat"], len(paths)),
    ]


def _rejudged(obs: Any, again: Any, exp: Any, full: float) -> Stage:
    """What the daemon's audit costs in a full resync of an unchanged tree: a look for what
    differs from the last observation, and judging only that."""
    from provenanced.core.audit import audit
    from provenanced.core.incremental import IncrementalAudit
    from provenanced.core.state import Touched

    kept = IncrementalAudit(obs, exp)
    runs: list[float] = []
    found: tuple[Any, ...] = ()
    for _ in range(_REPEATS):
        started = time.perf_counter()
        touched = Touched.between(obs, again)
        found = kept.update(again, touched.paths, touched.units)
        runs.append(time.perf_counter() - started)
    same = "yes" if found == audit(again, exp) else "NO"
    return Stage(
        "  audit of a full resync as the daemon does it: what differs, judged",
        median(runs),
        len(touched.paths) + len(touched.units),
        f"vs {ms(full)} for audit(); same findings: {same}",
    )


def _audit_prototypes(
    obs: Any, exp: Any, full: float, frozen_map: Callable[..., Any]
) -> list[Stage]:
    from provenanced.core.audit import audit

    stages = []
    # The audit of one unit's files: what a change would cost with an incremental audit.
    unit = next((u for u in obs.units.values() if u.fragment_path in obs.facts), None)
    if unit is not None:
        mine = {*unit.definition_paths}
        sub_obs = replace(
            obs,
            units=frozen_map({unit.name: unit}),
            facts=frozen_map({p: f for p, f in obs.facts.items() if p in mine}),
            scanned_files=frozenset(p for p in obs.scanned_files if p in mine),
        )
        sub_exp = replace(
            exp,
            home_manager_links=frozen_map(
                {p: e for p, e in exp.home_manager_links.items() if p in mine}
            ),
            baseline=frozen_map({p: b for p, b in exp.baseline.items() if p in mine}),
        )
        runs = []
        for _ in range(_REPEATS * 10):
            started = time.perf_counter()
            audit(sub_obs, sub_exp)
            runs.append(time.perf_counter() - started)
        stages.append(
            Stage(
                "prototype: audit() of one unit's files (incremental)",
                median(runs),
                len(mine),
                f"vs {ms(full)} for the whole tree on every change",
            )
        )
    return stages


def run(sandbox: Sandbox) -> list[Stage]:
    """The breakdown, or one row saying why it could not run against this tree's code."""
    try:
        return asyncio.run(breakdown(sandbox))
    except (ImportError, AttributeError, TypeError, KeyError) as exc:
        return [Stage(f"breakdown unavailable: {type(exc).__name__}: {exc}", math.nan)]


def render(size: int, stages: list[Stage]) -> str:
    """A Markdown table of the stages."""
    lines = [
        f"| full resync in-process, N = {size:,} | time (median of {_REPEATS}) | items | note |",
        "|---|---|---|---|",
    ]
    for s in stages:
        items = "" if s.items is None else str(s.items)
        lines.append(f"| {s.name} | {ms(s.seconds)} | {items} | {s.note} |")
    return "\n".join(lines)

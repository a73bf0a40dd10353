"""One size: build the tree, boot the sandbox, measure the baselines, then the daemon."""

from __future__ import annotations

import contextlib
import math
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from bench import baselines, breakdown, managerwatch, profile
from bench.changes import Batch, plan_changes, run_changes
from bench.daemonproc import DaemonError, DaemonProcess
from bench.proc import import_floor, loadavg, sample
from bench.stats import median, ms, percentile
from bench.tree import Tree, generate
from provenanced.sandbox import SYSTEMD_BINARY, Sandbox


@dataclass(frozen=True, slots=True)
class Plan:
    """How much of everything to measure at one size."""

    size: int
    changes: int
    resyncs: int
    scrapes: int
    idle_seconds: float
    node_exporter_scrapes: int
    timer_sample: int | None
    one_shot: int
    poll_interval: float
    change_budget: float = math.inf
    breakdown: bool = False
    profile: bool = False


@dataclass(slots=True)
class Result:
    """Every figure of one size; NaN where not measured."""

    size: int
    loadavg_before: str = ""
    loadavg_after: str = ""
    files: int = 0
    generate_seconds: float = math.nan
    boot_seconds: float = math.nan
    ready_seconds: float = math.nan
    notified_seconds: float = math.nan  # start → READY=1 on NOTIFY_SOCKET
    resyncs: list[float] = field(default_factory=list)
    dbus_calls_per_resync: float = math.nan
    resync_cpu: tuple[float, float] = (math.nan, math.nan)  # daemon, manager: CPU s per resync
    units_audited: float = math.nan
    scrapes: list[float] = field(default_factory=list)
    scrape_bytes: int = 0
    batch: Batch | None = None
    idle_seconds: float = 0.0
    idle_cpu: float = math.nan
    idle_dbus_calls: float = math.nan
    idle_wakeups: float = math.nan
    idle_manager_cpu: float = math.nan
    idle_dbus_by_method: dict[str, float] = field(default_factory=dict)
    idle_manager_activity: str = ""
    churn: list[str] = field(default_factory=list)
    rss_ready: int = 0
    rss_end: int = 0
    rss_peak: int = 0
    pss_end: int = 0
    rss_floor: int = 0
    timer: baselines.TimerPass | None = None
    batched_show: float = math.nan
    one_shot: list[baselines.OneShot] = field(default_factory=list)
    node_exporter: baselines.NodeExporterRun | None = None
    node_exporter_private: baselines.NodeExporterRun | None = None
    node_exporter_error: str | None = None
    errors: list[str] = field(default_factory=list)
    profiles: dict[str, str] = field(default_factory=dict)
    breakdown: list[breakdown.Stage] = field(default_factory=list)

    # derived figures -------------------------------------------------------------------------

    def latencies(self, attr: str, kind: str | None = None) -> list[float]:
        """One timing of every change (optionally of one kind), missing ones left out."""
        if self.batch is None:
            return []
        values = (getattr(s, attr) for s in self.batch.samples if kind is None or s.kind == kind)
        return [v for v in values if v is not None]

    def cpu_per_change(self) -> float:
        """Daemon CPU seconds per file operation (each change and its undo count as two)."""
        if self.batch is None or not self.batch.samples:
            return math.nan
        return self.batch.cpu_seconds / (2 * len(self.batch.samples))

    def p(self, attr: str, q: float, kind: str | None = None) -> float:
        """A percentile of one timing."""
        return percentile(self.latencies(attr, kind), q)


def log(message: str) -> None:
    """Progress on stderr-like stdout, flushed so `make bench` shows it live."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


_OWN_MOUNTS = """#!/bin/sh
# provenanced bench: the sandboxed manager in a mount namespace of its own. On a shared machine
# other processes mount and unmount all the time; the manager turns each change into .mount
# units coming and going, and the daemon answers each UnitNew/UnitRemoved with a D-Bus read.
exec unshare --mount --propagation private {systemd} "$@"
"""


def _manager_binary(workdir: Path, own_mounts: bool) -> Path:
    """The manager binary, or a wrapper that gives it a private copy of the mount table."""
    if not own_mounts:
        return SYSTEMD_BINARY
    wrapper = workdir / "systemd-own-mounts"
    wrapper.write_text(_OWN_MOUNTS.format(systemd=SYSTEMD_BINARY))
    wrapper.chmod(0o755)
    return wrapper


@contextlib.contextmanager
def _sandbox(workdir: Path, own_mounts: bool) -> Iterator[Sandbox]:
    sandbox = Sandbox(timeout=120.0, systemd_binary=_manager_binary(workdir, own_mounts))
    try:
        yield sandbox
    finally:
        sandbox.stop()


def run_size(plan: Plan, workdir: Path, node_exporter: bool, own_mounts: bool = True) -> Result:
    """Measure everything at one size; the sandbox and every process are gone on return."""
    result = Result(plan.size, loadavg_before=loadavg())
    with _sandbox(workdir, own_mounts) as sandbox:
        started = time.perf_counter()
        tree = generate(sandbox, plan.size)
        result.generate_seconds = time.perf_counter() - started
        result.files = tree.files
        started = time.perf_counter()
        sandbox.start()
        result.boot_seconds = time.perf_counter() - started
        log(
            f"N={plan.size}: {len(tree.units)} units, {tree.files} files, booted in "
            f"{result.boot_seconds:.1f} s"
        )
        _baselines(plan, sandbox, tree, result, workdir, node_exporter)
        daemon = DaemonProcess(
            sandbox,
            workdir / f"daemon-{plan.size}.log",
            # Reloading is an action behind a quiet window, excluded from the latency target;
            # flag-only keeps a reload of N units from landing inside the measured changes.
            need_daemon_reload="flag",
            # Changes reuse targets; every transition must reach the journal, not be rate-limited.
            alert_min_interval=0,
        )
        try:
            _measure_daemon(plan, sandbox, tree, daemon, result, workdir, own_mounts)
        except DaemonError as exc:
            result.errors.append(str(exc))
            log(f"N={plan.size}: daemon failed: {exc}")
        finally:
            daemon.stop()
        if plan.breakdown:
            log(f"N={plan.size}: timing the stages of a full resync in-process")
            result.breakdown = breakdown.run(sandbox)
    result.loadavg_after = loadavg()
    return result


def _baselines(
    plan: Plan, sandbox: Sandbox, tree: Tree, result: Result, workdir: Path, node_exporter: bool
) -> None:
    result.timer = baselines.timer_pass(sandbox, tree.units, plan.timer_sample)
    result.batched_show = baselines.batched_show(sandbox, tree.units)
    log(
        f"N={plan.size}: timer loop pass {result.timer.seconds:.2f} s "
        f"({result.timer.per_unit * 1000:.1f} ms/unit, {result.timer.sampled} sampled); "
        f"one batched systemctl show {result.batched_show:.2f} s"
    )
    if node_exporter:
        reason = baselines.node_exporter_available()
        if reason is None:
            try:
                result.node_exporter = baselines.run_node_exporter(
                    sandbox, plan.node_exporter_scrapes, workdir / "node_exporter.log"
                )
                result.node_exporter_private = baselines.run_node_exporter(
                    sandbox, plan.node_exporter_scrapes, workdir / "node_exporter.log", private=True
                )
                log(
                    f"N={plan.size}: node_exporter scrape median "
                    f"{result.node_exporter.median * 1000:.0f} ms over the bus, "
                    f"{result.node_exporter_private.median * 1000:.0f} ms over the private socket"
                )
            except baselines.NodeExporterError as exc:
                result.node_exporter_error = str(exc)
        else:
            result.node_exporter_error = reason
        if result.node_exporter_error:
            log(f"N={plan.size}: node_exporter: {result.node_exporter_error}")


def _measure_daemon(
    plan: Plan,
    sandbox: Sandbox,
    tree: Tree,
    daemon: DaemonProcess,
    result: Result,
    workdir: Path,
    own_mounts: bool,
) -> None:
    result.ready_seconds = daemon.start()
    result.notified_seconds = daemon.notified_seconds or math.nan
    result.rss_ready = daemon.proc().rss_bytes
    log(
        f"N={plan.size}: daemon READY=1 in {result.notified_seconds:.2f} s, "
        f"/-/ready in {result.ready_seconds:.2f} s, "
        f"RSS {result.rss_ready / 2**20:.1f} MiB"
    )
    for _ in range(plan.one_shot):
        # After the daemon's first start, so both use the baseline it recorded.
        result.one_shot.append(baselines.one_shot_audit(sandbox, daemon.env))
    _resyncs(plan, daemon, result)
    _scrapes(plan, daemon, result)
    changes = plan_changes(tree, plan.changes, sandbox.root / "bench-scratch")
    result.batch = run_changes(daemon, changes, plan.poll_interval, plan.change_budget)
    log(
        f"N={plan.size}: {len(changes)} changes: /metrics p50 {ms(result.p('to_metrics', 50))} "
        f"p99 {ms(result.p('to_metrics', 99))}; journal p50 {ms(result.p('to_journal', 50))} "
        f"p99 {ms(result.p('to_journal', 99))}; missed {result.batch.missed}, "
        f"journal missing {result.batch.journal_missing}, "
        f"/metrics samples left out {result.batch.journal_late}"
    )
    if plan.idle_seconds > 0:
        _idle(plan, sandbox, daemon, result)
    end = daemon.proc()
    result.rss_end, result.rss_peak, result.pss_end = end.rss_bytes, end.hwm_bytes, end.pss_bytes
    result.rss_floor = import_floor()
    if plan.idle_seconds > 0 and own_mounts:
        # Last: on this daemon it starts a load/unload loop that only stopping it ends.
        _mount_churn(plan, sandbox, daemon, result)
    if plan.profile:
        _profile(plan, sandbox, tree, daemon, result, workdir)


def _profile(
    plan: Plan, sandbox: Sandbox, tree: Tree, daemon: DaemonProcess, result: Result, workdir: Path
) -> None:
    """Extra resyncs and changes under py-spy, after (never during) the measured ones."""
    scratch = Result(plan.size)
    out = workdir / f"profile-{plan.size}-resync.txt"
    with profile.record(daemon.pid, out):
        _resyncs(replace(plan, resyncs=max(plan.resyncs, 3)), daemon, scratch)
    result.profiles["full resync"] = profile.render(
        f"py-spy, N={plan.size:,}, {len(scratch.resyncs)} full resyncs ({out})", out
    )
    out = workdir / f"profile-{plan.size}-changes.txt"
    changes = plan_changes(tree, 60, sandbox.root / "bench-scratch")
    with profile.record(daemon.pid, out):
        done = run_changes(daemon, changes, plan.poll_interval, budget=30.0)
    result.profiles["changes"] = profile.render(
        f"py-spy, N={plan.size:,}, {len(done.samples)} changes and undos ({out})", out
    )


@dataclass(frozen=True, slots=True)
class Resync:
    """One SIGHUP resync: its duration by the daemon's histogram, the CPU both sides spent."""

    seconds: float
    cpu: float  # the daemon's, from SIGHUP to the scrape that shows it (config reload, polls)
    manager_cpu: float
    before: dict[str, float]
    after: dict[str, float]


def hangup_resync(daemon: DaemonProcess) -> Resync:
    """SIGHUP: the daemon re-reads its config and resyncs everything; timed by its histogram."""
    name = "provenanced_resync_duration_seconds"
    before = daemon.metrics()
    cpu, manager_cpu = daemon.proc().cpu_seconds, sample(daemon.sandbox.manager_pid).cpu_seconds
    daemon.hangup()
    deadline = time.perf_counter() + 120
    while (after := daemon.metrics()).get(f"{name}_count", 0) <= before.get(f"{name}_count", 0):
        if time.perf_counter() > deadline:
            raise DaemonError("no full resync within 120 s of SIGHUP")
        time.sleep(0.05)
    return Resync(
        after[f"{name}_sum"] - before.get(f"{name}_sum", 0.0),
        daemon.proc().cpu_seconds - cpu,
        sample(daemon.sandbox.manager_pid).cpu_seconds - manager_cpu,
        before,
        after,
    )


def _resyncs(plan: Plan, daemon: DaemonProcess, result: Result) -> None:
    calls = "provenanced_dbus_calls_total"
    dbus: list[float] = []
    ours: list[float] = []
    theirs: list[float] = []
    for _ in range(plan.resyncs):
        resync = hangup_resync(daemon)
        ours.append(resync.cpu)
        theirs.append(resync.manager_cpu)
        result.resyncs.append(resync.seconds)
        after = resync.after
        dbus.append(_total(after, calls) - _total(resync.before, calls))
        result.units_audited = _total(after, "provenanced_units")
    result.dbus_calls_per_resync = median(dbus)
    result.resync_cpu = (median(ours), median(theirs))
    log(
        f"N={plan.size}: full resync median {median(result.resyncs) * 1000:.0f} ms "
        f"({plan.resyncs} repeats, {result.dbus_calls_per_resync:.0f} D-Bus calls each; CPU "
        f"daemon {median(ours) * 1000:.0f} ms, manager {median(theirs) * 1000:.0f} ms)"
    )


def _total(series: dict[str, float], name: str) -> float:
    return sum(v for k, v in series.items() if k == name or k.startswith(name + "{"))


def _scrapes(plan: Plan, daemon: DaemonProcess, result: Result) -> None:
    daemon.scrape()
    for _ in range(plan.scrapes):
        response = daemon.scrape()
        result.scrapes.append(response.seconds)
        result.scrape_bytes = len(response.body)
        time.sleep(0.01)


def _idle(plan: Plan, sandbox: Sandbox, daemon: DaemonProcess, result: Result) -> None:
    """Nothing happens for a while: CPU, D-Bus calls and wake-ups the daemon still spends."""
    calls = "provenanced_dbus_calls_total"
    before_series = daemon.metrics()
    before, manager_before = daemon.proc(), sample(sandbox.manager_pid)
    activity = managerwatch.watch(sandbox, plan.idle_seconds)
    result.idle_manager_activity = activity.describe()
    after, manager_after = daemon.proc(), sample(sandbox.manager_pid)
    # Read the counter after the /proc sample so this scrape's own cost is not counted.
    after_series = daemon.metrics()
    result.idle_dbus_calls = _total(after_series, calls) - _total(before_series, calls)
    result.idle_dbus_by_method = {
        key: value - before_series.get(key, 0.0)
        for key, value in after_series.items()
        if key.startswith(calls + "{") and value != before_series.get(key, 0.0)
    }
    result.idle_seconds = plan.idle_seconds
    result.idle_cpu = after.cpu_seconds - before.cpu_seconds
    # /proc/<pid>/status counts the main thread only: the event loop, not the HTTP thread.
    result.idle_wakeups = after.context_switches - before.context_switches
    result.idle_manager_cpu = manager_after.cpu_seconds - manager_before.cpu_seconds
    log(f"N={plan.size}: the manager while idle: {result.idle_manager_activity}")
    if result.idle_dbus_by_method:
        log(f"N={plan.size}: D-Bus calls while idle: {result.idle_dbus_by_method}")
    log(
        f"N={plan.size}: idle {plan.idle_seconds:.0f} s: {result.idle_cpu:.2f} CPU s, "
        f"{result.idle_dbus_calls:.0f} D-Bus calls, {result.idle_wakeups:.0f} context switches"
    )


_CHURN_WINDOW = 3.0


def _mount_churn(plan: Plan, sandbox: Sandbox, daemon: DaemonProcess, result: Result) -> None:
    """What another process's mount costs the daemon: one tmpfs mounted and unmounted in the
    manager's namespace (what a container runtime or an automounter does all day), then two
    windows of what the manager and the daemon do after it; the second shows whether it stops."""
    target = sandbox.root / "bench-mnt"
    target.mkdir(exist_ok=True)

    def mount_once() -> None:
        subprocess.run(
            ["nsenter", "--mount", f"--target={sandbox.manager_pid}", "sh", "-c",
             f"mount -t tmpfs bench {target} && umount {target}"],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip

    for label, start in (("0-3 s", mount_once), ("3-6 s", None)):
        calls = "provenanced_dbus_calls_total"
        before_calls, before = _total(daemon.metrics(), calls), daemon.proc()
        activity = managerwatch.watch(sandbox, _CHURN_WINDOW, start)
        cpu = daemon.proc().cpu_seconds - before.cpu_seconds
        dbus = _total(daemon.metrics(), calls) - before_calls
        result.churn.append(
            f"{label}: {dbus:.0f} calls, {cpu:.2f} CPU s, {sum(activity.loaded.values())} unit loads"
        )
        log(
            f"N={plan.size}: one mount+umount, {label} after: {activity.describe()}; "
            f"daemon {dbus:.0f} D-Bus calls, {cpu:.2f} CPU s"
        )


def workdir() -> Path:
    """Where daemon and node_exporter logs go for this run."""
    return Path(tempfile.mkdtemp(prefix="provenanced-bench-"))

"""Turn the per-size results into the Markdown tables `make bench` prints and the docs hold."""

from __future__ import annotations

import hashlib
import math
import os
import platform
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

from bench import breakdown
from bench.run import Result
from bench.stats import TIMES, median, ms, percentile, ratio

MIB = 2**20
# Detection by a loop that re-reads every unit back to back: a change waits for the read of its
# unit in the pass after it happened, uniformly spread; p50 ≈ one pass, p99 ≈ 1.98 passes.
_LOOP_P50, _LOOP_P99 = 1.0, 1.98

Row = tuple[str, Callable[[Result], str]]


def _mib(value: int) -> str:
    return f"{value / MIB:.1f} MiB" if value else "n/a"


def _seconds(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f} s"


def _count(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.0f}"


def _pair(a: str, b: str) -> str:
    return f"{a} / {b}"


def _resync(r: Result) -> float:
    return median(r.resyncs)


def _timer_p(r: Result, factor: float) -> float:
    return r.timer.seconds * factor if r.timer else math.nan


OURS: Sequence[Row] = (
    ("files in the tree (units)", lambda r: f"{r.files} ({r.size})"),
    (
        "daemon start → `READY=1` / → `/-/ready` 200",
        lambda r: f"{_seconds(r.notified_seconds)} / {_seconds(r.ready_seconds)}",
    ),
    (
        "full resync, median (min-max, n)",
        lambda r: (
            f"{ms(_resync(r))} ({ms(min(r.resyncs, default=math.nan))}-"
            f"{ms(max(r.resyncs, default=math.nan))}, {len(r.resyncs)})"
        ),
    ),
    ("D-Bus calls per full resync", lambda r: _count(r.dbus_calls_per_resync)),
    (
        "CPU per full resync, daemon / manager (median)",
        lambda r: f"{ms(r.resync_cpu[0])} / {ms(r.resync_cpu[1])}",
    ),
    (
        "change → finding on /metrics, p50 / p99",
        lambda r: _pair(ms(r.p("to_metrics", 50)), ms(r.p("to_metrics", 99))),
    ),
    (
        "change → journal entry, p50 / p99",
        lambda r: _pair(ms(r.p("to_journal", 50)), ms(r.p("to_journal", 99))),
    ),
    (
        "undo → finding gone from /metrics, p50 / p99",
        lambda r: _pair(ms(r.p("resolved_metrics", 50)), ms(r.p("resolved_metrics", 99))),
    ),
    (
        "changes (missed, journal missing, /metrics samples left out)",
        lambda r: (
            f"{len(r.batch.samples)} ({r.batch.missed}, {r.batch.journal_missing}, "
            f"{r.batch.journal_late})"
            if r.batch
            else "n/a"
        ),
    ),
    ("daemon CPU per file operation", lambda r: ms(r.cpu_per_change())),
    (
        "internal detection latency, mean (histogram)",
        lambda r: ms(r.batch.internal_mean) if r.batch and r.batch.internal_mean else "n/a",
    ),
    (
        "/metrics scrape, median / p99 (bytes)",
        lambda r: f"{ms(median(r.scrapes))} / {ms(percentile(r.scrapes, 99))} ({r.scrape_bytes})",
    ),
    (
        "RSS after ready / at end / peak",
        lambda r: f"{_mib(r.rss_ready)} / {_mib(r.rss_end)} / {_mib(r.rss_peak)}",
    ),
    (
        "RSS during the changes (after n changes)",
        lambda r: ", ".join(f"{n}: {_mib(b)}" for n, b in r.batch.rss) if r.batch else "n/a",
    ),
    (
        "PSS at end; RSS of interpreter + imports alone",
        lambda r: f"{_mib(r.pss_end)}; {_mib(r.rss_floor)}",
    ),
    (
        "idle: CPU s / D-Bus calls / loop wake-ups",
        lambda r: (
            f"{r.idle_cpu:.2f} / {r.idle_dbus_calls:.0f} / {r.idle_wakeups:.0f} "
            f"over {r.idle_seconds:.0f} s"
            if r.idle_seconds
            else "not measured"
        ),
    ),
    (
        "the manager meanwhile (jobs, unit loads)",
        lambda r: r.idle_manager_activity or "not measured",
    ),
    (
        "one tmpfs mount+umount elsewhere: daemon D-Bus calls, CPU",
        lambda r: "; ".join(r.churn) if r.churn else "not measured",
    ),
)

BASELINES: Sequence[Row] = (
    (
        "timer loop: one pass, `systemctl show` per unit",
        lambda r: (
            f"{_seconds(r.timer.seconds)} ({r.timer.per_unit * 1000:.1f} ms/unit"
            + (f", {r.timer.sampled} sampled)" if r.timer.sampled < r.timer.units else ")")
            if r.timer
            else "n/a"
        ),
    ),
    (
        "timer loop: CPU per pass (systemctl / manager)",
        lambda r: (
            f"{r.timer.cpu_seconds:.2f} s / {r.timer.manager_cpu_seconds:.2f} s"
            if r.timer
            else "n/a"
        ),
    ),
    ("  ratio: timer pass / our full resync", lambda r: ratio(_timer_p(r, 1.0), _resync(r))),
    (
        "timer loop back to back: detection p50 / p99",
        lambda r: _pair(_seconds(_timer_p(r, _LOOP_P50)), _seconds(_timer_p(r, _LOOP_P99))),
    ),
    (
        "  ratio: timer loop / ours, p50 / p99",
        lambda r: _pair(
            ratio(_timer_p(r, _LOOP_P50), r.p("to_metrics", 50)),
            ratio(_timer_p(r, _LOOP_P99), r.p("to_metrics", 99)),
        ),
    ),
    ("one batched `systemctl show` of all units", lambda r: _seconds(r.batched_show)),
    (
        "`provenanced audit --json` one-shot: wall / in-process",
        lambda r: _pair(
            _seconds(median([o.seconds for o in r.one_shot])),
            ms(median([o.reported for o in r.one_shot])),
        ),
    ),
    (
        "node_exporter systemd collector: scrape median, bus / private socket",
        lambda r: (
            _pair(ms(r.node_exporter.median), ms(r.node_exporter_private.median))
            if r.node_exporter and r.node_exporter_private
            else f"n/a ({r.node_exporter_error or 'skipped'})"
        ),
    ),
    (
        "  ratio: node_exporter scrape / our scrape, bus / private socket",
        lambda r: (
            _pair(
                ratio(r.node_exporter.median, median(r.scrapes)),
                ratio(r.node_exporter_private.median, median(r.scrapes)),
            )
            if r.node_exporter and r.node_exporter_private
            else "n/a"
        ),
    ),
    (
        "  ratio: node_exporter scrape / our full resync, bus / private socket",
        lambda r: (
            _pair(
                ratio(r.node_exporter.median, _resync(r)),
                ratio(r.node_exporter_private.median, _resync(r)),
            )
            if r.node_exporter and r.node_exporter_private
            else "n/a"
        ),
    ),
    (
        "node_exporter: CPU per scrape (itself / manager), bus",
        lambda r: (
            _pair(ms(r.node_exporter.cpu_per_scrape), ms(r.node_exporter.manager_cpu_per_scrape))
            if r.node_exporter
            else "n/a"
        ),
    ),
    (
        "node_exporter: CPU per scrape (itself / manager), private socket",
        lambda r: (
            _pair(
                ms(r.node_exporter_private.cpu_per_scrape),
                ms(r.node_exporter_private.manager_cpu_per_scrape),
            )
            if r.node_exporter_private
            else "n/a"
        ),
    ),
    (
        "node_exporter: body bytes, RSS",
        lambda r: (
            f"{r.node_exporter.body_bytes}, {_mib(r.node_exporter.rss_bytes)}"
            if r.node_exporter
            else "n/a"
        ),
    ),
)


def table(results: Sequence[Result], rows: Sequence[Row], title: str) -> str:
    """One Markdown table: a row per figure, a column per size."""
    head = f"| {title} | " + " | ".join(f"N = {r.size:,}" for r in results) + " |"
    rule = "|---|" + "---|" * len(results)
    lines = [head, rule]
    for label, cell in rows:
        cells = []
        for r in results:
            try:
                cells.append(cell(r))
            except (AttributeError, TypeError, ValueError, ZeroDivisionError):
                cells.append("n/a")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(results: Sequence[Result]) -> str:
    """Issue 15's goals at 1,000 units (or the nearest size measured), met or not."""
    if not results:
        return ""
    r = min(results, key=lambda x: abs(x.size - 1000))
    large = max(results, key=lambda x: x.size)
    exporter = r.node_exporter.median if r.node_exporter else math.nan
    # (name, goal, value, limit, format, higher is better)
    rows: list[tuple[str, str, float, float, Callable[[float], str], bool]] = [
        ("full resync", "≤ 100 ms", _resync(r), 0.100, ms, False),
        (
            "node_exporter scrape (bus) / our full resync",
            f"≥ 1.5{TIMES}",
            exporter / _resync(r),
            1.5,
            lambda v: f"{v:.1f}{TIMES}",
            True,
        ),
        ("change → finding p99 (/metrics)", "≤ 8 ms", r.p("to_metrics", 99), 0.008, ms, False),
        (
            f"change → finding p99 (/metrics) at N = {large.size:,}",
            "≤ 10 ms",
            large.p("to_metrics", 99),
            0.010,
            ms,
            False,
        ),
        ("/metrics scrape, median", "≤ 1 ms", median(r.scrapes), 0.001, ms, False),
        ("start → READY=1", "≤ 1 s", r.notified_seconds, 1.0, lambda v: f"{v:.2f} s", False),
        ("D-Bus calls while idle", "0", r.idle_dbus_calls, 0.0, lambda v: f"{v:.0f}", False),
        ("RSS once ready", "≤ 45 MB", _mb(r.rss_ready), 45.0, lambda v: f"{v:.1f} MB", False),
        ("RSS (peak)", "≤ 50 MB", _mb(r.rss_peak), 50.0, lambda v: f"{v:.1f} MB", False),
    ]
    lines = [f"| goal at N = {r.size:,} | goal | measured | met |", "|---|---|---|---|"]
    for name, goal, value, limit, fmt, higher in rows:
        ok = value >= limit if higher else value <= limit
        met = "n/a" if math.isnan(value) else ("yes" if ok else "**no**")
        shown = "n/a" if math.isnan(value) else fmt(value)
        lines.append(f"| {name} | {goal} | {shown} | {met} |")
    return "\n".join(lines)


def _mb(value: int | float | None) -> float:
    return value / 1e6 if value else math.nan


def flatness(results: Sequence[Result]) -> str:
    """The cost of one change at the smallest vs the largest size."""
    if len(results) < 2:
        return ""
    small, large = results[0], results[-1]
    lines = [
        f"| one change, N = {small.size:,} vs {large.size:,} | N = {small.size:,} | "
        f"N = {large.size:,} | ratio |",
        "|---|---|---|---|",
    ]
    for label, get in (
        ("change → /metrics p50", lambda r: r.p("to_metrics", 50)),
        ("change → /metrics p99", lambda r: r.p("to_metrics", 99)),
        ("daemon CPU per file operation", lambda r: r.cpu_per_change()),
    ):
        a, b = get(small), get(large)
        lines.append(f"| {label} | {ms(a)} | {ms(b)} | {ratio(b, a)} |")
    return "\n".join(lines)


def systemd_version() -> str:
    """The manager's version, from systemctl."""
    try:
        out = subprocess.run(
            ["systemctl", "--version"], capture_output=True, text=True, check=True, timeout=10
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.split("(", 1)[1].split(")", 1)[0] if "(" in out else out.split("\n", 1)[0]


def machine() -> str:
    """The machine the figures come from."""
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as handle:
            names = (
                line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")
            )
            cpu = next(names)
    except (OSError, StopIteration):
        pass
    try:
        with open("/proc/meminfo") as handle:
            kib = int(handle.readline().split()[1])
        memory = f"{kib / 2**20:.0f} GiB RAM"
    except (OSError, IndexError, ValueError):
        memory = "unknown RAM"
    return (
        f"{platform.node()}: {cpu}, {os.cpu_count()} CPUs, {memory}, Linux {platform.release()}, "
        f"Python {platform.python_version()}"
    )


def code_version() -> str:
    """The commit measured, and a hash of the daemon's sources (catches uncommitted edits)."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for path in sorted((root / "src" / "provenanced").rglob("*.py")):
        digest.update(path.read_bytes())
    sources = f"src sha256 {digest.hexdigest()[:10]}"
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "describe", "--always", "--dirty"],
            capture_output=True, text=True, check=True, timeout=10,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return f"unknown commit, {sources}"
    return f"{out.replace('-dirty', ' plus uncommitted changes')}, {sources}"


def _sources(version: str) -> str:
    return version.rpartition("src sha256 ")[2]


def render(results: Sequence[Result], code_at_start: str | None = None) -> str:
    """Every table, plus the load the shared machine was under and the code measured."""
    code = code_version()
    if code_at_start is not None and _sources(code_at_start) != _sources(code):
        code = f"{code_at_start} at the start, {code} at the end: SIZES MIX CODE VERSIONS"
    elif code_at_start is not None:
        code = code_at_start
    loads = "; ".join(f"N={r.size:,}: {r.loadavg_before} → {r.loadavg_after}" for r in results)
    errors = [f"- N={r.size:,}: {e}" for r in results for e in r.errors]
    parts = [
        f"machine: {machine()}",
        f"code: {code}; systemd {systemd_version()}",
        f"load average (1/5/15 min) before → after each size: {loads}",
        "",
        table(results, OURS, "provenanced"),
        "",
        table(results, BASELINES, "baselines (same run)"),
        "",
        flatness(results),
        "",
        targets(results),
    ]
    parts += [f"\n{breakdown.render(r.size, r.breakdown)}" for r in results if r.breakdown]
    profiles = [text for r in results for text in r.profiles.values()]
    if profiles:
        parts += ["", *profiles]
    if errors:
        parts += ["", "errors:", *errors]
    return "\n".join(parts)

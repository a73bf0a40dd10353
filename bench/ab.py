"""`python -m bench.ab --base REV`: the daemon of an earlier commit against this tree's, in turns.

One sandboxed manager with the bench's tree; a daemon started from the sources of ``REV`` (taken
with ``git archive``) and one from this tree's ``src`` run alternately, round after round, so the
machine's drift falls on both sides alike. Each daemon does full resyncs (SIGHUP), scrapes, then
changes and their undos, exactly as ``python -m bench`` measures them. Only the daemon's code
differs: the bench code, the tree and the manager are the same.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.changes import Change, plan_changes, run_changes
from bench.cli import _exit_on_signal
from bench.daemonproc import DaemonError, DaemonProcess
from bench.run import _sandbox, hangup_resync, log
from bench.stats import ms
from bench.tree import generate
from provenanced.errors import ProvenancedError
from provenanced.sandbox import ensure_journald

_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Side:
    """Everything one side measured, over all its rounds."""

    label: str
    src: Path
    resyncs: list[float] = field(default_factory=list)
    resync_cpu: list[float] = field(default_factory=list)
    manager_cpu: list[float] = field(default_factory=list)
    scrapes: list[float] = field(default_factory=list)
    to_metrics: list[float] = field(default_factory=list)
    to_journal: list[float] = field(default_factory=list)
    cpu_per_op: list[float] = field(default_factory=list)


def _sources(rev: str, into: Path) -> Path:
    """``src`` as it was at ``rev``, unpacked under ``into``."""
    archive = into / "src.tar"
    subprocess.run(["git", "-C", str(_ROOT), "archive", "-o", str(archive), rev, "src"], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    return into / "src"


def _round(side: Side, daemon: DaemonProcess, resyncs: int, changes: list[Change]) -> None:
    for _ in range(resyncs):
        resync = hangup_resync(daemon)
        side.resyncs.append(resync.seconds)
        side.resync_cpu.append(resync.cpu)
        side.manager_cpu.append(resync.manager_cpu)
    daemon.scrape()
    for _ in range(100):
        side.scrapes.append(daemon.scrape().seconds)
        time.sleep(0.01)
    batch = run_changes(daemon, changes, 0.002)
    for s in batch.samples:
        side.to_metrics += [v for v in (s.to_metrics, s.resolved_metrics) if v is not None]
        side.to_journal += [v for v in (s.to_journal, s.resolved_journal) if v is not None]
    side.cpu_per_op.append(batch.cpu_seconds / max(1, 2 * len(batch.samples)))


def _q(values: list[float], p: int) -> float:
    return statistics.quantiles(values, n=100)[p - 1] if len(values) > 1 else float("nan")


def _report(sides: list[Side], size: int, rounds: int) -> str:
    med = statistics.median
    rows: list[tuple[str, Callable[[Side], str]]] = [
        ("full resync, median", lambda s: ms(med(s.resyncs))),
        ("CPU per full resync, daemon / manager", lambda s: f"{ms(med(s.resync_cpu))} / "
         f"{ms(med(s.manager_cpu))}"),
        ("change → /metrics, p50 / p99", lambda s: f"{ms(_q(s.to_metrics, 50))} / "
         f"{ms(_q(s.to_metrics, 99))} (n={len(s.to_metrics)})"),
        ("change → journal, p50 / p99", lambda s: f"{ms(_q(s.to_journal, 50))} / "
         f"{ms(_q(s.to_journal, 99))}"),
        ("daemon CPU per file operation", lambda s: ms(med(s.cpu_per_op))),
        ("/metrics scrape, median", lambda s: ms(med(s.scrapes))),
    ]  # fmt: skip
    head = f"| N = {size:,}, {rounds} rounds | " + " | ".join(s.label for s in sides) + " |"
    lines = [head, "|---" * (len(sides) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(cell(s) for s in sides) + " |" for name, cell in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__)
    parser.add_argument("--base", required=True, help="the commit to compare this tree against")
    parser.add_argument("--size", type=int, default=1000, help="units in the tree (1000)")
    parser.add_argument("--rounds", type=int, default=3, help="turns per side (3)")
    parser.add_argument("--resyncs", type=int, default=8, help="SIGHUP resyncs per turn (8)")
    parser.add_argument("--changes", type=int, default=60, help="changes per turn (60)")
    args = parser.parse_args(argv)
    for signum in (signal.SIGTERM, signal.SIGHUP):  # unwind through the finally blocks
        signal.signal(signum, _exit_on_signal)
    if os.geteuid() != 0:
        print("bench.ab: needs root (the sandbox's cgroups, journald)", file=sys.stderr)
        return 2
    try:
        journald = ensure_journald()
    except ProvenancedError as exc:
        print(f"bench.ab: {exc}", file=sys.stderr)
        return 3
    try:
        with tempfile.TemporaryDirectory(prefix="provenanced-ab-") as tmp:
            work = Path(tmp)
            try:
                base = _sources(args.base, work)
            except subprocess.CalledProcessError:
                print(f"bench.ab: no sources at {args.base!r}", file=sys.stderr)
                return 2
            sides = [Side(args.base, base), Side("this tree", _ROOT / "src")]
            with _sandbox(work, own_mounts=True) as sandbox:
                tree = generate(sandbox, args.size)
                sandbox.start()
                for turn in range(args.rounds):
                    for side in sides:
                        log(f"round {turn + 1}/{args.rounds}: {side.label}")
                        daemon = DaemonProcess(
                            sandbox, work / "daemon.log", need_daemon_reload="flag",
                            alert_min_interval=0,
                        )  # fmt: skip
                        daemon.env["PYTHONPATH"] = str(side.src)  # ahead of the installed tree
                        changes = plan_changes(tree, args.changes, sandbox.root / "ab-scratch")
                        try:
                            daemon.start()
                            _round(side, daemon, args.resyncs, changes)
                        except DaemonError as exc:
                            print(f"bench.ab: {side.label}: {exc}", file=sys.stderr)
                            return 1
                        finally:
                            daemon.stop()
    finally:
        if journald is not None:
            journald.stop()
    print(_report(sides, args.size, args.rounds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`python -m bench [--quick] [--sizes 100,1000,10000]`: measure, then print the tables."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from bench import report
from bench.profile import ProfilerError, py_spy
from bench.run import Plan, Result, log, run_size, workdir
from provenanced.errors import ProvenancedError
from provenanced.sandbox import ensure_journald

DEFAULT_SIZES = (100, 1000, 10000)


def plans(sizes: Sequence[int], quick: bool, args: argparse.Namespace) -> list[Plan]:
    """What to measure at each size; --quick trades statistical weight for a shorter run."""
    result = []
    for size in sizes:
        big = size > 1000
        result.append(
            Plan(
                size=size,
                changes=args.changes or (60 if quick else 210),
                # Above 1,000 units the daemon's per-change cost decides how many fit in the run.
                change_budget=(30.0 if quick else 60.0) if big else math.inf,
                breakdown=size in args.breakdown_sizes,
                resyncs=3 if quick or big else 7,
                scrapes=30 if quick else 100,
                idle_seconds=(args.idle if args.idle is not None else (15.0 if quick else 60.0))
                if size == args.idle_size
                else 0.0,
                node_exporter_scrapes=3 if quick or big else 7,
                # A full per-unit pass at 5,000 units takes ~50 s; an even spread scales linearly.
                timer_sample=(200 if quick else 300) if size > 1000 else None,
                one_shot=1 if quick or big else 3,
                poll_interval=args.poll_ms / 1000.0,
                profile=args.profile,
            )
        )
    return result


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def build_parser() -> argparse.ArgumentParser:
    """The bench's options."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and changes, 15 s idle")
    parser.add_argument(
        "--sizes",
        default=",".join(map(str, DEFAULT_SIZES)),
        help="comma-separated unit counts (default %(default)s)",
    )
    parser.add_argument(
        "--changes",
        type=int,
        default=0,
        help="changes per size (default 210; above 1,000 units at most 60 s of them, min. 30)",
    )
    parser.add_argument("--idle", type=float, default=None, help="idle seconds (default 60)")
    parser.add_argument("--idle-size", type=int, default=1000, help="size to measure idle cost at")
    parser.add_argument("--poll-ms", type=float, default=2.0, help="/metrics poll interval, ms")
    parser.add_argument(
        "--breakdown",
        default="1000",
        help="sizes to time a full resync's stages at, in-process ('' for none; default 1000)",
    )
    parser.add_argument(
        "--host-mounts",
        action="store_true",
        help="let the sandboxed manager see the host's mount churn (default: its own namespace)",
    )
    parser.add_argument("--no-node-exporter", action="store_true", help="skip node_exporter")
    parser.add_argument("--json", type=Path, help="also write every raw figure to this file")
    parser.add_argument("--keep-logs", action="store_true", help="keep the daemon logs")
    parser.add_argument(
        "--profile", action="store_true", help="extra resyncs and changes under py-spy (keeps logs)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run every size in turn; the tables go to stdout at the end."""
    args = build_parser().parse_args(argv)
    # `timeout`, a closed terminal or kill: unwind through the finally blocks that stop sandboxes.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _exit_on_signal)
    if args.profile:
        args.keep_logs = True
        try:
            py_spy()
        except ProfilerError as exc:
            print(f"bench: {exc}", file=sys.stderr)
            return 2
    if os.geteuid() != 0:
        print("bench: needs root (the sandbox's cgroups, journald, node_exporter)", file=sys.stderr)
        return 2
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    args.breakdown_sizes = {int(s) for s in args.breakdown.split(",") if s.strip()}
    logs = workdir()
    results: list[Result] = []
    code_at_start = report.code_version()
    try:
        journald = ensure_journald()
    except ProvenancedError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 3
    try:
        for plan in plans(sizes, args.quick, args):
            # Another session may have stopped a journald it had started; make sure one listens.
            restarted = ensure_journald()
            if restarted is not None:
                if journald is not None:
                    journald.stop()
                journald = restarted
            results.append(
                run_size(
                    plan,
                    logs,
                    node_exporter=not args.no_node_exporter,
                    own_mounts=not args.host_mounts,
                )
            )
    except KeyboardInterrupt:
        log("interrupted; reporting what was measured")
    finally:
        if journald is not None:
            journald.stop()
        if not args.keep_logs:
            shutil.rmtree(logs, ignore_errors=True)
        else:
            log(f"logs kept in {logs}")
    print()
    print(report.render(results, code_at_start))
    if args.json:
        args.json.write_text(json.dumps([dataclasses.asdict(r) for r in results], indent=1))
    return 1 if any(r.errors for r in results) else 0

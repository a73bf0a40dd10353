"""`python -m bench.hmswitch`: what today's daemon says while Home Manager switches.

One switch per release and form: podman-web.service changes, backup.service and its timer stay,
old-sync.service goes and new-sync.service comes (`provenanced.sandbox.example_switch`), with
seconds of package installs before the links move and seconds of other entries between the
links and sd-switch. The daemon runs as a process with its default policy, the fake store as
its managed root. Counted from the moment the activation is triggered until ``--after`` seconds
past its end: drift-detected journal entries, distinct findings seen on /api/v1/findings
(sampled every 10 ms) and daemon-reloads the daemon did (its reload-done entries), those within
the activation named separately.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench import http
from bench.daemonproc import HOST, DaemonProcess
from bench.journalwatch import JournalWatch
from bench.run import log, workdir
from provenanced.sandbox import (
    FORMS,
    RELEASES,
    Form,
    Options,
    Release,
    Sandbox,
    auto_upgrade_units,
    build_generation,
    ensure_journald,
    example_switch,
    prepare_switch,
    run_switch,
)
from provenanced.sinks.journal import DRIFT_DETECTED, DRIFT_RESOLVED, RELOAD_DONE

SAMPLE_INTERVAL = 0.010
_SETTLE = 3.0  # past the default 2 s quiet window: the daemon has acted on what it saw

Finding = tuple[str, str, str]  # kind, unit, path


@dataclass(slots=True)
class Outcome:
    """What one switch looked like from the daemon's side."""

    release: str
    form: str
    activation: tuple[float, float] = (0.0, 0.0)  # CLOCK_MONOTONIC, from the operation log
    detected: int = 0
    reloads_during: int = 0
    reloads: int = 0
    seen: set[Finding] = field(default_factory=set)
    open_before: int = 0
    open_at_end: set[Finding] = field(default_factory=set)
    samples: int = 0


class FindingsSampler:
    """GET /api/v1/findings every 10 ms in a thread; remembers every finding it ever saw."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.seen: set[Finding] = set()
        self.last: set[Finding] = set()
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench.findings", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError, http.HttpError, ValueError):
                body = http.get(HOST, self.port, "/api/v1/findings", timeout=5.0).body
                found = {(f["kind"], f["unit"], f["path"]) for f in json.loads(body)["findings"]}
                self.seen |= found
                self.last = found
                self.samples += 1
            self._stop.wait(SAMPLE_INTERVAL)

    @contextlib.contextmanager
    def running(self) -> Iterator[FindingsSampler]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join(timeout=10)


def measure(release: Release, form: Form, options: Options, after: float, logs: Path) -> Outcome:
    """Boot a sandbox on the first generation, start the daemon, switch, count."""
    outcome = Outcome(release, form)
    with Sandbox() as sandbox:
        extra = auto_upgrade_units(sandbox) if form == "auto-upgrade" else {}
        before, after_files = example_switch()
        first = build_generation(sandbox.store, {**before, **extra}, "a", release)
        second = build_generation(sandbox.store, {**after_files, **extra}, "b", release)
        # The auto-upgrade unit comes with the first generation: install that one by hand.
        run_switch(sandbox, first, "standalone" if form == "auto-upgrade" else form)
        daemon = DaemonProcess(sandbox, logs / f"daemon-{release}-{form}.log")
        daemon.start()
        try:
            prepare_switch(sandbox, second, form, options)
            time.sleep(_SETTLE)  # let the daemon settle on what the preparation changed
            watch = JournalWatch(daemon.pid, (DRIFT_DETECTED, DRIFT_RESOLVED, RELOAD_DONE))
            sampler = FindingsSampler(daemon.port)
            outcome.open_before = len(
                json.loads(daemon.scrape("/api/v1/findings").body)["findings"]
            )
            with sampler.running():
                triggered = time.monotonic()
                ops = run_switch(sandbox, second, form, options, prepared=True)
                time.sleep(after)
            entries = watch.drain(settle=0.5)
            watch.close()
        finally:
            daemon.stop()
    start = next(op.at for op in ops if op.path == "activation-start")
    end = next(op.at for op in ops if op.path == "activation-end")
    outcome.activation = (start, end)
    window = [e for e in entries if e.monotonic >= triggered]
    during = [e for e in window if e.monotonic <= end]
    outcome.detected = sum(e.message_id == DRIFT_DETECTED for e in window)
    outcome.reloads = sum(e.message_id == RELOAD_DONE for e in window)
    outcome.reloads_during = sum(e.message_id == RELOAD_DONE for e in during)
    outcome.seen, outcome.open_at_end, outcome.samples = sampler.seen, sampler.last, sampler.samples
    return outcome


def _short(finding: Finding) -> str:
    kind, unit, path = finding
    return f"{kind} {unit} {Path(path).name}"


def _spread(values: Sequence[float]) -> str:
    low, high = min(values), max(values)
    return f"{low:g}" if low == high else f"{low:g}-{high:g}"


def table(outcomes: Sequence[Outcome]) -> str:
    """The figures as a Markdown table, one row per release and form (ranges over repeats)."""
    lines = [
        "| release | form | runs | open before | activation | drift detected "
        "| distinct findings seen "
        "| still open after | daemon-reloads by provenanced: during the activation (in all) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    groups: dict[tuple[str, str], list[Outcome]] = {}
    for o in outcomes:
        groups.setdefault((o.release, o.form), []).append(o)
    for (release, form), runs in groups.items():
        kinds = sorted({f[0] for o in runs for f in o.seen})
        seconds = [round(o.activation[1] - o.activation[0], 1) for o in runs]
        lines.append(
            f"| {release} | {form} | {len(runs)} | {_spread([o.open_before for o in runs])} "
            f"| {_spread(seconds)} s "
            f"| {_spread([o.detected for o in runs])} "
            f"| {_spread([len(o.seen) for o in runs])} ({', '.join(kinds) or '-'}) "
            f"| {_spread([len(o.open_at_end) for o in runs])} "
            f"| {_spread([o.reloads_during for o in runs])} "
            f"({_spread([o.reloads for o in runs])}) |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hmswitch", description=__doc__)
    parser.add_argument("--releases", default=",".join(RELEASES))
    parser.add_argument("--forms", default=",".join(FORMS))
    parser.add_argument("--install-seconds", type=float, default=2.0)
    parser.add_argument("--entries-seconds", type=float, default=3.0)
    parser.add_argument("--after", type=float, default=5.0, help="seconds counted past the end")
    parser.add_argument("--repeat", type=int, default=1, help="switches per release and form")
    parser.add_argument("--details", action="store_true", help="list every finding seen")
    args = parser.parse_args(argv)
    options = Options(install_seconds=args.install_seconds, entries_seconds=args.entries_seconds)
    logs = workdir()
    journald = ensure_journald()
    outcomes = []
    try:
        for release in args.releases.split(","):
            for form in [f for f in args.forms.split(",") for _ in range(args.repeat)]:
                log(f"switch: release {release}, {form}")
                outcome = measure(release, form, options, args.after, logs)  # type: ignore[arg-type]
                outcomes.append(outcome)
                if args.details:
                    for finding in sorted(outcome.seen):
                        still = " (still open)" if finding in outcome.open_at_end else ""
                        print(f"    seen: {_short(finding)}{still}", flush=True)
    finally:
        if journald is not None:
            journald.stop()
    print(
        f"\ninstall {args.install_seconds:g} s before the links, other entries "
        f"{args.entries_seconds:g} s before sd-switch, counted until {args.after:g} s after\n"
    )
    print(table(outcomes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`provenanced demo --scenario`: drift caught live, and Ctrl-C leaves nothing running."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import free_port, wait_until
from provenanced.sandbox import SANDBOX_MARKER

pytestmark = pytest.mark.e2e

CLI = str(Path(sys.executable).parent / "provenanced")
_ROOT_LINE = re.compile(r"a throw-away systemd --user in (?P<root>\S+)")
_STEP_LINE = re.compile(r"^\[step (?P<number>\d+)/(?P<total>\d+)\](?P<repair> repairing)?", re.M)
_SWITCH_LINE = re.compile(r"switch done in [\d.]+ s: (?P<report>.*)")
_SILENT = (
    "0 findings, 0 drift entries, no reload of the daemon's own; "
    "old-sync.service not-found, new-sync.service loaded"
)
# Each drift step waits at most 20 s for its finding and 20 s for the repair, then pauses
# 8 + 4 s; the switch at the end takes seconds.
_SCENARIO_TIMEOUT = 360


def findings(port: int) -> list[dict[str, str]]:
    """The demo daemon's open findings; empty while it does not answer yet."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/findings", timeout=5) as r:
            document = json.load(r)
    except (OSError, urllib.error.URLError, ValueError):
        return []
    found: list[dict[str, str]] = document["findings"]
    return found


def processes_of(root: str) -> list[int]:
    """Pids whose environment or command line names the sandbox root: what must be gone."""
    marker = f"{SANDBOX_MARKER}={root}".encode()
    runtime = f"XDG_RUNTIME_DIR={root}/run".encode()
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = Path(entry.path, "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker in environ or runtime in environ:
            pids.append(int(entry.name))
    return pids


class Demo:
    """A running `provenanced demo --scenario` and where its output goes."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.proc, self.port, self.log = proc, port, log

    def output(self) -> str:
        """Everything it printed so far (stdout and stderr)."""
        return self.log.read_text(errors="replace")

    def scenario_over(self) -> bool:
        """The scenario printed its closing line, whatever the outcome."""
        return re.search(r"^Scenario (done|incomplete)", self.output(), re.M) is not None

    def steps(self) -> tuple[int, dict[tuple[int, bool], str]]:
        """The announced step count, and what each step printed, keyed by (number, repair)."""
        output = self.output()
        marks = list(_STEP_LINE.finditer(output))
        ends = [mark.start() for mark in marks[1:]] + [len(output)]
        total = int(marks[0]["total"]) if marks else 0
        return total, {
            (int(mark["number"]), bool(mark["repair"])): output[mark.end() : end]
            for mark, end in zip(marks, ends, strict=True)
        }

    def sandbox_root(self) -> str | None:
        """The sandbox root from the banner, once printed."""
        match = _ROOT_LINE.search(self.output())
        return match["root"] if match else None


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[Demo]:
    """The demo as a user runs it, output to a file; interrupted, never leaked, on failure."""
    port = free_port()
    log = tmp_path / "demo.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [CLI, "demo", "--scenario", "--listen", f"127.0.0.1:{port}"],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield Demo(proc, port, log)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_scenario_is_caught_and_ctrl_c_cleans_up(demo: Demo) -> None:
    """The injected link replacement shows on /api/v1/findings; SIGINT exits 0, nothing left."""
    root = wait_until(demo.sandbox_root, timeout=60, message="the demo's banner")
    assert root is not None
    wait_until(
        lambda: any(f["kind"] == "link-replaced" for f in findings(demo.port)),
        timeout=60,
        interval=0.2,
        message="a link-replaced finding on /api/v1/findings",
    )
    assert processes_of(root), "the sandbox's manager should be running before Ctrl-C"
    demo.proc.send_signal(signal.SIGINT)
    assert demo.proc.wait(timeout=60) == 0, demo.output()
    assert "[step 1/6]" in demo.output()
    assert processes_of(root) == []
    assert not Path(root).exists()


def test_every_step_is_seen_and_resolved(demo: Demo) -> None:
    """The README's headline, end to end: each injected drift is seen and each repair resolves
    it (step 4 is the restart that exits 0 while the never-run unit's condition fails); the
    last step, a real Home Manager switch, passes by no finding, no drift entry and no reload
    of the daemon's own while it runs, the removed unit gone and the added one loaded."""
    root = wait_until(demo.sandbox_root, timeout=60, message="the demo's banner")
    wait_until(
        demo.scenario_over, timeout=_SCENARIO_TIMEOUT, interval=0.5, message="the scenario's end"
    )
    total, steps = demo.steps()
    injected = sorted(number for number, repair in steps if not repair)
    assert total > 1 and injected == list(range(1, total + 1)), demo.output()
    assert [number for number, repair in steps if repair], demo.output()
    switch = _SWITCH_LINE.search(steps[(total, False)])
    assert switch is not None and switch["report"] == _SILENT, demo.output()
    drifts = {key: text for key, text in steps.items() if key != (total, False)}
    not_seen = [
        n for (n, repair), text in drifts.items() if not repair and "seen after" not in text
    ]
    not_resolved = [
        n for (n, repair), text in drifts.items() if repair and "resolved after" not in text
    ]
    assert (not_seen, not_resolved) == ([], []), demo.output()
    assert "Scenario done: every drift was seen and repaired, and the switch was silent" in (
        demo.output()
    )
    demo.proc.send_signal(signal.SIGINT)
    assert demo.proc.wait(timeout=60) == 0, demo.output()
    assert root is not None
    assert processes_of(root) == []

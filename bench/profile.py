"""Sample the daemon with py-spy while a phase runs, and say where its CPU went.

py-spy is a developer tool, not a dependency: `.venv/bin/pip install py-spy` to use --profile.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path


class ProfilerError(Exception):
    """py-spy is missing or failed."""


def py_spy() -> str:
    """The py-spy next to our interpreter, or on PATH."""
    found = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if found is None:
        raise ProfilerError("--profile needs py-spy: .venv/bin/pip install py-spy")
    return found


@contextlib.contextmanager
def record(pid: int, output: Path, rate: int = 500) -> Iterator[Path]:
    """py-spy samples ``pid`` (without pausing it) until the block ends; collapsed stacks out."""
    proc = subprocess.Popen(
        [py_spy(), "record", "--pid", str(pid), "--rate", str(rate), "--nonblocking",
         "--format", "raw", "--output", str(output)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        yield output
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            err = b""
        if not output.exists():
            raise ProfilerError(f"py-spy wrote nothing: {err.decode(errors='replace')[-500:]}")


def summarize(path: Path, top: int = 14) -> list[tuple[float, float, str]]:
    """(inclusive %, self %, function) of the hottest functions, by samples on the CPU.

    Functions on (nearly) every stack, the event loop and the entry points, say nothing and are
    left out; so are threads' bootstrap frames. Line numbers are dropped so a function's samples
    add up wherever in it they fell.
    """
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_function(f) for f in stack.split(";") if f and not f.startswith(_SKIP)]
        if not frames:
            continue
        total += count
        for frame in set(frames):
            inclusive[frame] += count
        own[frames[-1]] += count
    if not total:
        return []
    rows = [
        (100.0 * n / total, 100.0 * own[frame] / total, frame)
        for frame, n in inclusive.most_common()
        if not frame.endswith(_PLUMBING) or own[frame] >= 0.05 * total
    ]
    return rows[:top]


def http_share(path: Path) -> float:
    """Percent of the samples spent serving HTTP (our scrapes), not in the event loop."""
    total = served = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if count_text.isdigit():
            total += int(count_text)
            served += int(count_text) if "process_request_thread" in stack else 0
    return 100.0 * served / total if total else 0.0


_SKIP = ("process ", "thread ")
# Frames on every stack of their thread: entry points, the event loop, thread and server plumbing.
_PLUMBING = (
    "(<frozen runpy>)", "(asyncio/runners.py)", "(asyncio/base_events.py)", "(threading.py)",
    "(socketserver.py)", "(http/server.py)", "(provenanced/__main__.py)", "(provenanced/cli.py)",
)  # fmt: skip


def _function(frame: str) -> str:
    """`name (file.py:123)` → `name (file.py)`."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rpartition(':')[0] or where.rstrip(')')})"


def render(title: str, path: Path) -> str:
    """A small table of the hottest functions of one recording."""
    rows = summarize(path)
    lines = [f"{title}: {http_share(path):.0f}% of samples served HTTP", "  incl%  self%  function"]
    lines += [f"  {a:5.1f}  {b:5.1f}  {frame}" for a, b, frame in rows]
    return "\n".join(lines)

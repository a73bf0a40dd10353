"""What /proc says about one process: CPU seconds, resident memory, context switches."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class ProcSample:
    """A snapshot of a process's cumulative counters."""

    cpu_seconds: float
    rss_bytes: int
    hwm_bytes: int
    pss_bytes: int
    context_switches: int


def sample(pid: int) -> ProcSample:
    """utime+stime from /proc/<pid>/stat, VmRSS/VmHWM and context switches from status."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # fields[0] is the state (stat field 3); utime and stime are stat fields 14 and 15.
    cpu = (int(fields[11]) + int(fields[12])) / _TICKS
    status: dict[str, str] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        status[key] = value.strip()
    return ProcSample(
        cpu_seconds=cpu,
        rss_bytes=_kib(status.get("VmRSS", "0 kB")),
        hwm_bytes=_kib(status.get("VmHWM", "0 kB")),
        pss_bytes=_pss(pid),
        context_switches=int(status.get("voluntary_ctxt_switches", "0"))
        + int(status.get("nonvoluntary_ctxt_switches", "0")),
    )


def _pss(pid: int) -> int:
    """Proportional set size: shared library pages counted once across the processes mapping
    them (libssl, libpython), a fairer footprint than RSS on a machine running many Pythons."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return _kib(line.split(":", 1)[1])
    except OSError:
        pass
    return 0


_FLOOR = """
import provenanced.cli, provenanced.daemon.service
for line in open("/proc/self/status"):
    if line.startswith("VmRSS:"):
        print(line.split()[1])
"""


def import_floor() -> int:
    """RSS of an interpreter that imported the daemon and did nothing else, in bytes."""
    out = subprocess.run(
        [sys.executable, "-c", _FLOOR], capture_output=True, text=True, check=True
    ).stdout
    return int(out.split()[0]) * 1024


def _kib(value: str) -> int:
    return int(value.split()[0]) * 1024


def loadavg() -> str:
    """The 1/5/15-minute load average, recorded with each run because the machine is shared."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])

"""What people run today instead: a timer looping `systemctl --user show`, and node_exporter."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench import http
from bench.proc import sample
from bench.stats import median
from provenanced.sandbox import SYSTEM_PATH, Sandbox

SHOW_PROPERTIES = ("FragmentPath", "DropInPaths", "NeedDaemonReload")
NODE_EXPORTER = "prometheus-node-exporter"
_SYSTEMD = '{collector="systemd"}'


def _systemctl() -> str:
    return shutil.which("systemctl", path=SYSTEM_PATH) or "systemctl"


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass(frozen=True, slots=True)
class TimerPass:
    """One pass of the timer-driven audit loop over every unit (extrapolated when sampled)."""

    units: int
    sampled: int
    seconds: float
    cpu_seconds: float
    manager_cpu_seconds: float

    @property
    def per_unit(self) -> float:
        """Wall seconds per unit."""
        return self.seconds / self.units


def timer_pass(sandbox: Sandbox, units: list[str], sample_size: int | None = None) -> TimerPass:
    """`systemctl --user show -p FragmentPath -p DropInPaths -p NeedDaemonReload` once per unit.

    With ``sample_size`` only an evenly spread subset runs and the figures scale to all units:
    at 5,000 units a full pass takes about a minute and says nothing a sample does not.
    """
    chosen = units
    if sample_size is not None and sample_size < len(units):
        step = len(units) / sample_size
        chosen = [units[int(i * step)] for i in range(sample_size)]
    argv = [_systemctl(), "--user", "--no-pager", "show"]
    for prop in SHOW_PROPERTIES:
        argv += ["-p", prop]
    manager_before = sample(sandbox.manager_pid).cpu_seconds
    cpu_before = _children_cpu()
    started = time.perf_counter()
    for unit in chosen:
        subprocess.run([*argv, unit], env=sandbox.env, capture_output=True, check=True)
    seconds = time.perf_counter() - started
    scale = len(units) / len(chosen)
    return TimerPass(
        units=len(units),
        sampled=len(chosen),
        seconds=seconds * scale,
        cpu_seconds=(_children_cpu() - cpu_before) * scale,
        manager_cpu_seconds=(sample(sandbox.manager_pid).cpu_seconds - manager_before) * scale,
    )


def batched_show(sandbox: Sandbox, units: list[str]) -> float:
    """The same properties for every unit from one `systemctl show` process: the loop done well."""
    argv = [_systemctl(), "--user", "--no-pager", "show"]
    for prop in SHOW_PROPERTIES:
        argv += ["-p", prop]
    started = time.perf_counter()
    subprocess.run([*argv, *units], env=sandbox.env, capture_output=True, check=True)
    return time.perf_counter() - started


@dataclass(frozen=True, slots=True)
class OneShot:
    """`provenanced audit --json` run from a timer: wall time and the time it reports itself."""

    seconds: float
    reported: float
    units: int


def one_shot_audit(sandbox: Sandbox, env: dict[str, str]) -> OneShot:
    """One `python -m provenanced audit --json`, interpreter start-up included."""
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "provenanced", "audit", "--json"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    seconds = time.perf_counter() - started
    if result.returncode not in (0, 1):
        raise RuntimeError(f"provenanced audit exited {result.returncode}: {result.stderr.strip()}")
    document = json.loads(result.stdout)
    return OneShot(seconds, float(document["duration_seconds"]), int(document["units"]))


@dataclass(frozen=True, slots=True)
class NodeExporterRun:
    """node_exporter's systemd collector scraped a few times against the sandbox's user bus."""

    scrapes: list[float]
    collector: list[float]
    body_bytes: int
    unit_series: int
    cpu_per_scrape: float
    manager_cpu_per_scrape: float
    rss_bytes: int

    @property
    def median(self) -> float:
        """Median scrape wall time."""
        return median(self.scrapes)


class NodeExporterError(Exception):
    """node_exporter could not be run against the sandbox."""


def node_exporter_available() -> str | None:
    """Why node_exporter cannot run here, or None when it can."""
    if shutil.which(NODE_EXPORTER, path=SYSTEM_PATH) is None:
        return f"{NODE_EXPORTER} is not installed (apt-get install -y prometheus-node-exporter)"
    if shutil.which("unshare", path=SYSTEM_PATH) is None:
        return "unshare (util-linux) is missing"
    if os.geteuid() != 0:
        return "binding the sandbox's bus over /run/dbus/system_bus_socket needs root"
    for directory in ("/run/dbus", "/run/systemd"):
        if not os.path.isdir(directory):
            return f"{directory} does not exist to mount over"
    return None


def run_node_exporter(
    sandbox: Sandbox, scrapes: int, log: Path, private: bool = False
) -> NodeExporterRun:
    """node_exporter in a mount namespace of its own where the system bus is the sandbox's.

    By default a tmpfs over /run/dbus (inside the namespace only) gets a file the sandbox's user
    bus socket is bind-mounted onto: go-systemd dials it as the system bus and finds the user
    manager there as org.freedesktop.systemd1. With ``private`` the manager's private socket is
    bind-mounted over /run/systemd/private instead and node_exporter's hidden
    ``--collector.systemd.private`` flag dials it peer-to-peer, as provenanced does. The host's
    /run is never touched.
    """
    port = http.free_port()
    if private:
        socket_dir, socket_name = "/run/systemd", "private"
        source, extra = sandbox.private_socket, " --collector.systemd.private"
    else:
        socket_dir, socket_name = "/run/dbus", "system_bus_socket"
        source, extra = sandbox.runtime_dir / "bus", ""
    script = (
        f"mount -t tmpfs -o mode=0755 tmpfs {socket_dir}"
        f" && touch {socket_dir}/{socket_name}"
        f" && mount --bind {source} {socket_dir}/{socket_name}"
        f" && exec {NODE_EXPORTER} --collector.disable-defaults --collector.systemd{extra}"
        f" --web.disable-exporter-metrics --web.listen-address=127.0.0.1:{port}"
    )
    with log.open("ab") as out:
        proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
            env={"PATH": SYSTEM_PATH, "LANG": "C.UTF-8"},
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_listening(proc, port, log)
        http.get("127.0.0.1", port)  # the first scrape connects to the bus; not measured
        times, collector = [], []
        before, manager_before = sample(proc.pid), sample(sandbox.manager_pid)
        body = b""
        for _ in range(scrapes):
            response = http.get("127.0.0.1", port)
            times.append(response.seconds)
            body = response.body
            series = http.samples(body.decode())
            collector.append(series.get(f"node_scrape_collector_duration_seconds{_SYSTEMD}", 0.0))
            if series.get(f"node_scrape_collector_success{_SYSTEMD}") != 1.0:
                raise NodeExporterError(f"the systemd collector failed: see {log}")
        after, manager_after = sample(proc.pid), sample(sandbox.manager_pid)
        text = body.decode()
        return NodeExporterRun(
            scrapes=times,
            collector=collector,
            body_bytes=len(body),
            unit_series=sum(1 for line in text.splitlines() if 'name="bench-' in line),
            cpu_per_scrape=(after.cpu_seconds - before.cpu_seconds) / scrapes,
            manager_cpu_per_scrape=(manager_after.cpu_seconds - manager_before.cpu_seconds)
            / scrapes,
            rss_bytes=after.rss_bytes,
        )
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def _wait_listening(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-1500:]
            raise NodeExporterError(f"node_exporter exited with {proc.returncode}:\n{tail}")
        with contextlib.suppress(OSError):
            if http.get("127.0.0.1", port, "/", timeout=2).status == 200:
                return
        time.sleep(0.05)
    raise NodeExporterError("node_exporter did not listen within 15 s")

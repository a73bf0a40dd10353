"""A quadlet source replaced behind Home Manager's back: how soon is it seen, does a reload hide it.

``python -m bench.quadlet_source`` (as root: it boots its own sandboxed manager, which runs the
quadlet stand-in as its generator). The source of the generated ``proxy.service`` is a Home
Manager link; it is replaced by an edited regular file (a new image tag,
``PublishPort=0.0.0.0:80:80``). Prints how long until ``/api/v1/findings`` names the source,
whether the daemon reloaded the manager (the generator re-running on the edit), and what is
still open after that reload. The figures go to docs/reliability.md; no test asserts on them.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from bench import http
from bench.daemonproc import HOST, DaemonProcess
from provenanced.sandbox import Sandbox, example_units
from provenanced.sandbox.quadlet import container_source

SOURCE = ".config/containers/systemd/proxy.container"
PATIENCE = 30.0


def _findings(daemon: DaemonProcess) -> list[dict[str, str]]:
    body = http.get(HOST, daemon.port, "/api/v1/findings").body
    findings: list[dict[str, str]] = json.loads(body)["findings"]
    return findings


def _reloads(daemon: DaemonProcess) -> float:
    return sum(v for k, v in daemon.metrics().items() if k.startswith("provenanced_reloads_total"))


def main() -> None:
    """Boot, run the daemon (reload policy), replace the source, and watch."""
    sandbox = Sandbox()
    try:
        files = example_units()
        files[SOURCE] = container_source("docker.io/library/nginx:1.25")
        sandbox.install_home_manager(files)
        sandbox.install_quadlet()
        sandbox.start()
        sandbox.systemctl("start", "proxy.service")
        with tempfile.TemporaryDirectory() as tmp:
            daemon = DaemonProcess(sandbox, Path(tmp) / "daemon.log", quiet_window=1.0)
            if "PYTHONPATH" in os.environ:  # to measure another checkout's code
                daemon.env["PYTHONPATH"] = os.environ["PYTHONPATH"]
            try:
                daemon.start()
                source = sandbox.home / SOURCE
                reloads = _reloads(daemon)
                started = time.perf_counter()
                source.unlink()
                source.write_text(
                    container_source("docker.io/library/nginx:latest", "0.0.0.0:80:80")
                )
                seen = float("inf")
                while time.perf_counter() - started < PATIENCE:
                    if seen == float("inf") and any(
                        f["path"] == str(source) for f in _findings(daemon)
                    ):
                        seen = time.perf_counter() - started
                    if _reloads(daemon) > reloads and seen != float("inf"):
                        break
                    time.sleep(0.01)
                print(f"source finding after {seen:.3f} s (patience {PATIENCE:.0f} s)")
                print(f"reloads by the daemon: {_reloads(daemon) - reloads:.0f}")
                generated = sandbox.runtime_dir / "systemd/generator/proxy.service"
                print(f"generated unit runs the edit: {'nginx:latest' in generated.read_text()}")
                time.sleep(2.0)  # let the post-reload resync land before reading what is open
                still = sorted((f["kind"], f["path"]) for f in _findings(daemon))
                print(f"open after the reload: {still}")
            finally:
                daemon.stop()
    finally:
        sandbox.stop()


if __name__ == "__main__":
    main()

"""Ten thousand Home-Manager-style units: the full audit completes, memory stays bounded."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemonkit import DaemonProcess, config_toml, daemon_process, poll
from provenanced.sandbox import Sandbox

pytestmark = pytest.mark.fault

UNITS = 10_000
# A sanity bound, not a benchmark: the daemon peaked at ~95 MiB on 10,000 units here (see
# docs/reliability.md); quadratic growth or a leak per unit would blow well past it.
PEAK_RSS_LIMIT = 512 * 1024 * 1024


@pytest.fixture(scope="module")
def big_sandbox() -> Iterator[Sandbox]:
    """A manager over a Home Manager generation of 10,000 small services."""
    sandbox = Sandbox()
    names = [f"unit-{i:05d}.service" for i in range(UNITS)]
    # Ordered after default.target's drop-in, the manager loads every unit at boot without
    # starting one, as it would units a real configuration references (provenanced never does).
    ordering = "".join(f"After={' '.join(names[i : i + 100])}\n" for i in range(0, UNITS, 100))
    try:
        sandbox.install_home_manager(
            {
                **{
                    f".config/systemd/user/{name}": (
                        f"[Unit]\nDescription=generated unit {i}\n[Service]\nExecStart=/bin/true\n"
                    )
                    for i, name in enumerate(names)
                },
                ".config/systemd/user/default.target.d/scale.conf": f"[Unit]\n{ordering}",
            }
        )
        sandbox.start()
        yield sandbox
    finally:
        sandbox.stop()


def _findings(proc: DaemonProcess) -> set[tuple[str, str]]:
    return {(f["kind"], f["path"]) for f in proc.findings()}


class TestTenThousandUnits:
    def test_full_audit_completes_with_bounded_memory(
        self, big_sandbox: Sandbox, tmp_path: Path
    ) -> None:
        """The daemon's first full audit of 10,000 units finishes clean; one drift is then found on its own."""
        config = config_toml(big_sandbox, "[policy]", 'need_daemon_reload = "flag"')
        with daemon_process(big_sandbox, tmp_path, config, ready_timeout=150) as proc:
            assert proc.metric("provenanced_units", load_state="loaded") >= UNITS
            assert proc.findings() == []
            path = big_sandbox.config_dir / "unit-04242.service"
            target = os.readlink(path)
            path.unlink()
            path.write_text("[Service]\nExecStart=/bin/false\n")
            poll(lambda: ("link-replaced", str(path)) in _findings(proc), message="one drift")
            assert {p for _, p in _findings(proc)} == {str(path)}
            path.unlink()
            path.symlink_to(target)
            poll(lambda: proc.findings() == [], message="clean again")
            assert proc.peak_rss() < PEAK_RSS_LIMIT, proc.peak_rss()
            assert proc.alive()

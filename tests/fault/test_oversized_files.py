"""Huge files in the unit directories: the manager is never made to read them, the loop never stalls."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from daemonkit import WEB, DaemonProcess, config_toml, daemon_process, poll, unit_file
from provenanced.sandbox import Sandbox

pytestmark = pytest.mark.fault

GIB = 1 << 30
# Generous bounds on things that take milliseconds, far below what the faults cost: the
# manager stalled for minutes reading a 1 GiB unit, and hashing 16 GiB held the loop for 53 s.
MANAGER_ANSWERS = 5.0
DETECTED = 20.0


def sparse(path: Path, size: int) -> Path:
    """A file of ``size`` zero bytes that takes no disk space."""
    with path.open("wb"):
        pass
    os.truncate(path, size)
    return path


def loaded_units(sandbox: Sandbox) -> set[str]:
    """What the manager holds in memory; ListUnits never loads anything itself."""
    listed = sandbox.systemctl(
        "list-units", "--all", "--plain", "--no-legend", "--full", timeout=MANAGER_ANSWERS
    ).stdout
    return {line.split()[0] for line in listed.splitlines() if line.strip()}


def detail(proc: DaemonProcess, path: Path, kind: str = "") -> str:
    """The detail of the finding (of ``kind``, if given) on ``path``; "" while there is none."""
    return next(
        (
            f["detail"]
            for f in proc.findings()
            if f["path"] == str(path) and kind in ("", f["kind"])
        ),
        "",
    )


def reloads(proc: DaemonProcess, result: str) -> float:
    """daemon-reload requests with this outcome, whatever triggered them."""
    return sum(
        proc.metric("provenanced_reloads_total", trigger=trigger, result=result)
        for trigger in ("need-daemon-reload", "content-hash")
    )


class TestUnitNothingLoaded:
    def test_a_1gib_unit_file_is_judged_from_disk_and_never_loaded(
        self, fresh_sandbox: Sandbox, tmp_path: Path
    ) -> None:
        """A 1 GiB unit nothing references is reported as too large; the manager never loads it and keeps answering."""
        sandbox = fresh_sandbox
        config = config_toml(sandbox, "[policy]", 'need_daemon_reload = "flag"')
        with daemon_process(sandbox, tmp_path, config) as proc:
            big = sparse(sandbox.config_dir / "big.service", GIB)
            poll(
                lambda: "too large to hash" in detail(proc, big, "unmanaged-unit"),
                message="big.service reported",
            )
            assert "big.service" not in loaded_units(sandbox)
            # A small unit file next to it is judged from disk the same way, and not loaded either.
            small = unit_file(sandbox.config_dir, "small.service")
            poll(lambda: detail(proc, small, "unmanaged-unit"), message="small.service reported")
            assert not {"big.service", "small.service"} & loaded_units(sandbox)
            assert proc.alive()

    def test_show_refuses_to_load_an_oversized_unit(self, fresh_sandbox: Sandbox) -> None:
        """`show` loads an unloaded unit on request, but never one with a file over the cap."""
        sandbox = fresh_sandbox
        sparse(sandbox.config_dir / "big.service", GIB)
        dropin = sandbox.config_dir / "small.service.d" / "big.conf"
        dropin.parent.mkdir()
        sparse(dropin, GIB)
        unit_file(sandbox.config_dir, "small.service")
        unit_file(sandbox.config_dir, "plain.service")
        for unit, path in (("big.service", "big.service"), ("small.service", "big.conf")):
            result = subprocess.run(
                [sys.executable, "-m", "provenanced", "show", unit],
                env=sandbox.env,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert result.returncode == 1, result
            assert result.stderr.count("\n") == 1 and path in result.stderr, result.stderr
            assert "over the 1048576-byte cap" in result.stderr
        assert not {"big.service", "small.service"} & loaded_units(sandbox)
        shown = subprocess.run(
            [sys.executable, "-m", "provenanced", "show", "plain.service"],
            env=sandbox.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert shown.returncode == 0 and "plain.service" in shown.stdout, shown


class TestReloadWithAnOversizedDropin:
    def test_no_reload_while_a_loaded_unit_has_a_file_over_the_cap(
        self, fresh_sandbox: Sandbox, tmp_path: Path
    ) -> None:
        """A 1 GiB drop-in of a loaded unit is reported and holds the automatic reload back."""
        sandbox = fresh_sandbox
        assert WEB in loaded_units(sandbox)
        with daemon_process(sandbox, tmp_path, config_toml(sandbox)) as proc:
            dropin = sandbox.config_dir / f"{WEB}.d" / "big.conf"
            sparse(dropin, GIB)
            poll(
                lambda: "too large to hash" in detail(proc, dropin, "unmanaged-dropin"),
                message="big.conf reported",
            )
            poll(lambda: reloads(proc, "deferred") >= 1, message="the reload held back")
            assert WEB in loaded_units(sandbox)
            assert reloads(proc, "ok") == reloads(proc, "failed") == 0
            assert "reload.refused" in proc.log()
            assert proc.alive()


class TestHugeFilesOffTheLoop:
    def test_a_new_unit_next_to_16gib_files_is_detected_at_once(
        self, fresh_sandbox: Sandbox, tmp_path: Path
    ) -> None:
        """16 GiB files, with a unit name or any other, are not hashed; a new unit beside them is seen promptly."""
        sandbox = fresh_sandbox
        config = config_toml(sandbox, "[policy]", 'need_daemon_reload = "flag"')
        with daemon_process(sandbox, tmp_path, config) as proc:
            huge = sparse(sandbox.config_dir / "huge.service", 16 * GIB)
            sparse(sandbox.config_dir / "huge.img", 16 * GIB)
            new = unit_file(sandbox.config_dir, "next.service")
            poll(lambda: detail(proc, new, "unmanaged-unit"), DETECTED, message="next.service seen")
            poll(
                lambda: "too large to hash" in detail(proc, huge, "unmanaged-unit"),
                message="huge.service reported",
            )
            assert proc.get("/-/healthy")[0] == 200
            assert proc.alive()

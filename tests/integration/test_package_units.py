"""The vendor tier judged by a real dpkg database: a tiny package installed with ``dpkg --root``.

Nothing here touches the host's /usr or /var/lib/dpkg: real dpkg installs a package built by
``dpkg-deb`` into a private root inside the sandbox, and the sandboxed manager searches that
root's ``usr/lib/systemd/user`` as its vendor directory.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemonkit import Running, eventually, settings_for, start_daemon
from provenanced.config import ProvenanceSettings, Settings
from provenanced.model import FindingKind
from provenanced.sandbox import Sandbox

pytestmark = [pytest.mark.integration, pytest.mark.dpkg]

PACKAGE = "provenanced-test-units"
UNIT = "hello.service"
DROPIN = "hello.service.d/10-package.conf"
WANTS_LINK = "hello.target.wants/hello.service"
BODY = {"1.0": "[Service]\nExecStart=/bin/true\n", "2.0": "[Service]\nExecStart=/bin/echo 2\n"}
# The old version's postrm runs after dpkg put the new files in place and before it records
# their md5sums; this one waits there until the test lets it go.
HELD_POSTRM = """#!/bin/sh
if [ "$1" = upgrade ] && [ -n "$PROVENANCED_TEST_GATE" ]; then
    cat "$PROVENANCED_TEST_GATE" >/dev/null
fi
"""


class PackageRoot:
    """A private dpkg root: its database, its vendor unit directory, and the packages built."""

    def __init__(self, root: Path, builds: Path) -> None:
        self.root, self.builds = root, builds
        self.vendor = root / "usr/lib/systemd/user"
        admin = root / "var/lib/dpkg"
        for sub in ("info", "updates"):
            (admin / sub).mkdir(parents=True, exist_ok=True)
        (admin / "status").touch()

    def build(self, version: str, postrm: str | None = None) -> Path:
        """A .deb of the test package, with one unit, a drop-in and an enablement link."""
        tree = self.builds / f"{PACKAGE}-{version}"
        units = tree / "usr/lib/systemd/user"
        (units / "hello.service.d").mkdir(parents=True)
        (units / "hello.target.wants").mkdir()
        (units / UNIT).write_text(BODY[version])
        (units / DROPIN).write_text("[Service]\nEnvironment=FROM=package\n")
        (units / WANTS_LINK).symlink_to(f"../{UNIT}")
        control = tree / "DEBIAN"
        control.mkdir()
        (control / "control").write_text(
            f"Package: {PACKAGE}\nVersion: {version}\nArchitecture: all\n"
            "Maintainer: provenanced tests <tests@invalid>\n"
            "Description: user units for provenanced's package tests\n"
        )
        if postrm is not None:
            (control / "postrm").write_text(postrm)
            (control / "postrm").chmod(0o755)
        deb = self.builds / f"{PACKAGE}_{version}_all.deb"
        _run(["dpkg-deb", "--root-owner-group", "--build", str(tree), str(deb)])
        return deb

    def install_argv(self, deb: Path) -> list[str]:
        """``dpkg -i`` into this root only: its own log, scripts run without a chroot."""
        return [
            "dpkg",
            f"--root={self.root}",
            f"--log={self.builds / 'dpkg.log'}",
            "--force-script-chrootless",
            "-i",
            str(deb),
        ]

    def install(self, deb: Path) -> None:
        _run(self.install_argv(deb))

    async def start_install(
        self, deb: Path, env: dict[str, str] | None = None
    ) -> asyncio.subprocess.Process:
        """``dpkg -i`` beside the daemon's event loop, not blocking it."""
        return await asyncio.create_subprocess_exec(
            *self.install_argv(deb),
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )


def _run(argv: list[str]) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{' '.join(argv)}: {result.stderr}"


@pytest.fixture
def packaged(tmp_path: Path) -> Iterator[tuple[Sandbox, PackageRoot]]:
    """A sandboxed manager whose vendor directory holds version 1.0 of the test package."""
    pkg = PackageRoot(tmp_path / "root", tmp_path / "builds")
    pkg.builds.mkdir()
    pkg.install(pkg.build("1.0", postrm=HELD_POSTRM))
    sandbox = Sandbox(unit_dirs=[pkg.vendor])
    try:
        sandbox.start()
        yield sandbox, pkg
    finally:
        sandbox.stop()


def settings(sandbox: Sandbox, pkg: PackageRoot) -> Settings:
    base = settings_for(sandbox, need_daemon_reload="flag")
    provenance = ProvenanceSettings(packages="dpkg", package_root=str(pkg.root))
    return base.model_copy(update={"provenance": provenance})


def package_findings(daemon: Running) -> set[tuple[str, str, str]]:
    kinds = (FindingKind.PACKAGE_MODIFIED, FindingKind.PACKAGE_UNOWNED)
    return {
        (f.kind.value, f.unit, f.path) for f in daemon.engine.status.findings if f.kind in kinds
    }


def detail(daemon: Running, kind: FindingKind, path: Path) -> str:
    findings = daemon.engine.status.findings
    return next(f.detail for f in findings if (f.kind, f.path) == (kind, str(path)))


def read_as(daemon: Running, path: Path, body: str) -> bool:
    """Whether the daemon's last look at ``path`` saw ``body``, with the MD5 dpkg checks."""
    obs = daemon.engine.state.observation
    fact = obs.facts.get(str(path)) if obs is not None else None
    return fact is not None and fact.md5 == hashlib.md5(body.encode()).hexdigest()


def release(gate: Path) -> bool:
    """Open the FIFO the postrm reads once it is there to read it: the postrm then goes on."""
    try:
        os.close(os.open(gate, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:  # ENXIO: no reader yet
        return False
    return True


class TestDaemon:
    async def test_modified_and_unowned_vendor_units_name_the_package(
        self, packaged: tuple[Sandbox, PackageRoot]
    ) -> None:
        """An edited packaged unit is package-modified, a stray file package-unowned, both named."""
        sandbox, pkg = packaged
        unit, stray = pkg.vendor / UNIT, pkg.vendor / "stray.service"
        async with start_daemon(sandbox, settings(sandbox, pkg)) as daemon:
            assert package_findings(daemon) == set()
            unit.write_text(BODY["1.0"] + "Environment=EDITED=1\n")
            stray.write_text("[Service]\nExecStart=/bin/true\n")
            await eventually(lambda: daemon.has(FindingKind.PACKAGE_MODIFIED, unit))
            await eventually(lambda: daemon.has(FindingKind.PACKAGE_UNOWNED, stray))
            assert f"package {PACKAGE} installed" in detail(
                daemon, FindingKind.PACKAGE_MODIFIED, unit
            )
            assert "not in the dpkg database" in detail(daemon, FindingKind.PACKAGE_UNOWNED, stray)
            assert package_findings(daemon) == {
                ("package-modified", UNIT, str(unit)),
                ("package-unowned", "stray.service", str(stray)),
            }
            unit.write_text(BODY["1.0"])
            stray.unlink()
            await eventually(lambda: package_findings(daemon) == set(), what="both resolved")

    async def test_an_upgrade_through_dpkg_is_read_again_and_raises_nothing(
        self, packaged: tuple[Sandbox, PackageRoot]
    ) -> None:
        """Mid-run the new file is in place before its md5sums: nothing is reported until the run
        ends, and then the new database vouches for the new file."""
        sandbox, pkg = packaged
        unit = pkg.vendor / UNIT
        gate = pkg.builds / "gate"
        os.mkfifo(gate)
        deb = pkg.build("2.0")
        async with start_daemon(sandbox, settings(sandbox, pkg)) as daemon:
            env = {**os.environ, "PROVENANCED_TEST_GATE": str(gate)}
            upgrade = await pkg.start_install(deb, env)
            try:
                await eventually(lambda: unit.read_text() == BODY["2.0"], what="2.0 unpacked")
                # A change in a user directory after it: once it is seen, so was the unpacking.
                marker = sandbox.config_dir / "marker.service"
                marker.write_text("[Service]\nExecStart=/bin/true\n")
                await eventually(lambda: daemon.has(FindingKind.UNMANAGED_UNIT, marker))
                assert package_findings(daemon) == set()
            finally:
                await eventually(lambda: release(gate) or upgrade.returncode is not None)
                async with asyncio.timeout(120):
                    output, _ = await upgrade.communicate()
            assert upgrade.returncode == 0, output.decode()
            await eventually(lambda: read_as(daemon, unit, BODY["2.0"]), what="2.0 read after")
            assert package_findings(daemon) == set()
            assert (
                daemon.sample("provenanced_findings_detected_total", kind="package-modified") == 0
            )

    async def test_a_reinstall_resolves_a_modification(
        self, packaged: tuple[Sandbox, PackageRoot]
    ) -> None:
        """dpkg putting its own file back (and a new version's md5sums) closes the finding."""
        sandbox, pkg = packaged
        unit = pkg.vendor / UNIT
        deb = pkg.build("2.0")
        async with start_daemon(sandbox, settings(sandbox, pkg)) as daemon:
            unit.write_text("[Service]\nExecStart=/bin/false\n")
            await eventually(lambda: daemon.has(FindingKind.PACKAGE_MODIFIED, unit))
            reinstall = await pkg.start_install(deb)
            async with asyncio.timeout(120):
                output, _ = await reinstall.communicate()
            assert reinstall.returncode == 0, output.decode()
            await eventually(lambda: not daemon.has(FindingKind.PACKAGE_MODIFIED, unit))
            assert unit.read_text() == BODY["2.0"]
            assert package_findings(daemon) == set()


def provenanced(sandbox: Sandbox, pkg: PackageRoot, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **sandbox.env,
        "PROVENANCED_PROVENANCE__PACKAGES": "dpkg",
        "PROVENANCED_PROVENANCE__PACKAGE_ROOT": str(pkg.root),
    }
    return subprocess.run(
        [sys.executable, "-m", "provenanced", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


class TestCommands:
    def test_audit_and_show_name_the_package(self, packaged: tuple[Sandbox, PackageRoot]) -> None:
        """``audit`` lists both kinds with the package; ``show`` names who installed each file."""
        sandbox, pkg = packaged
        assert provenanced(sandbox, pkg, "audit").returncode == 0  # records the first baseline
        unit, stray = pkg.vendor / UNIT, pkg.vendor / "stray.service"
        unit.write_text(BODY["1.0"] + "Environment=EDITED=1\n")
        stray.write_text("[Service]\nExecStart=/bin/true\n")
        result = provenanced(sandbox, pkg, "audit", "--json")
        assert result.returncode == 1, result.stderr
        found = {(f["kind"], f["path"]): f for f in json.loads(result.stdout)["findings"]}
        assert set(found) == {("package-modified", str(unit)), ("package-unowned", str(stray))}
        modified = found[("package-modified", str(unit))]
        assert modified["severity"] == "critical"
        assert f"package {PACKAGE} installed" in modified["detail"]

        result = provenanced(sandbox, pkg, "show", UNIT)
        assert result.returncode == 0, result.stderr
        rows = {line.split()[-1]: line for line in result.stdout.splitlines()[2:]}
        assert f"none ({PACKAGE}, modified)" in rows[str(unit)]
        assert f"package:{PACKAGE}" in rows[str(pkg.vendor / DROPIN)]

        shown = json.loads(provenanced(sandbox, pkg, "show", "--json", UNIT).stdout)[0]
        assert (shown["fragment"]["owner"], shown["fragment"]["package"]) == ("none", PACKAGE)
        assert [(d["owner"], d["package"]) for d in shown["dropins"]] == [("package", PACKAGE)]

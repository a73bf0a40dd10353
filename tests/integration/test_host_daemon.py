"""The host daemon as root against real users' managers: one process, every user, each alone."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemonkit import WAIT, eventually, http_get
from helpers import wait_until
from hostkit import EDITED, UNIT, host_settings, replace_link, running_host, user_has, user_ready
from provenanced.daemon.discovery import Logind
from provenanced.daemon.host import HostDaemon
from provenanced.model import FindingKind
from provenanced.sandbox import HostSandbox, Journald

pytestmark = [pytest.mark.integration, pytest.mark.host]

SHADOW = Path("/etc/shadow")


def _samples(daemon: HostDaemon, name: str) -> list[dict[str, str]]:
    assert daemon.http is not None
    status, body = http_get(daemon.http.address, "/metrics")
    assert status == 200
    return [
        sample.labels
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
        if sample.name == name and sample.value == 1
    ]


def _findings_api(daemon: HostDaemon, query: str) -> tuple[int, bytes]:
    assert daemon.http is not None
    return http_get(daemon.http.address, f"/api/v1/findings{query}")


class TestHostDaemon:
    """Every user's manager followed by one root process, findings kept apart by user."""

    async def test_each_users_findings_carry_their_name(
        self, host_sandbox: HostSandbox, tmp_path: Path
    ) -> None:
        """Two users: only the one who edited has the finding, on /metrics and ?user=."""
        alice, bob = host_sandbox.add_user(), host_sandbox.add_user()
        async with running_host(
            host_settings(host_sandbox, tmp_path / "state", [alice, bob])
        ) as daemon:
            await eventually(
                lambda: user_ready(daemon, alice) and user_ready(daemon, bob), WAIT, "ready"
            )
            path = replace_link(alice)
            await eventually(
                lambda: user_has(daemon, alice, FindingKind.LINK_REPLACED, path), WAIT, "detected"
            )
            replaced = [
                s for s in _samples(daemon, "provenanced_finding") if s["kind"] == "link-replaced"
            ]
            assert [(s["user"], s["path"]) for s in replaced] == [(alice.account.name, str(path))]
            ready = {s["user"] for s in _samples(daemon, "provenanced_ready")}
            assert ready == {alice.account.name, bob.account.name}
            status, body = _findings_api(daemon, f"?user={alice.account.name}")
            assert status == 200
            assert str(path) in [f["path"] for f in json.loads(body)["findings"]]
            status, body = _findings_api(daemon, f"?user={bob.account.name}")
            assert status == 200 and str(path) not in body.decode()
            assert _findings_api(daemon, "?user=nobody-here")[0] == 404
            # The state dir is the daemon's, per user, and no other user may look inside.
            state = tmp_path / "state" / alice.account.name
            assert state.stat().st_uid == 0 and state.stat().st_mode & 0o077 == 0

    async def test_a_link_to_etc_shadow_leaks_nothing(
        self, host_sandbox: HostSandbox, tmp_path: Path
    ) -> None:
        """A unit linked to /etc/shadow is a finding, but its hash is nowhere the daemon answers."""
        mallory = host_sandbox.add_user()
        link = mallory.config_dir / "shadow.service"
        async with running_host(
            host_settings(host_sandbox, tmp_path / "state", [mallory])
        ) as daemon:
            await eventually(lambda: user_ready(daemon, mallory), WAIT, "ready")
            link.symlink_to(SHADOW)
            os.chown(link, mallory.account.uid, mallory.account.gid, follow_symlinks=False)
            engine = daemon.engine(mallory.account.name)
            assert engine is not None
            await eventually(
                lambda: any(f.path == str(link) for f in engine.status.findings), WAIT, "seen"
            )
            obs = engine.state.observation
            assert obs is not None
            assert (obs.facts[str(link)].sha256, obs.facts[str(link)].error) == (
                None,
                "Permission denied",
            )
            secret = hashlib.sha256(SHADOW.read_bytes()).hexdigest()
            assert daemon.http is not None
            metrics = http_get(daemon.http.address, "/metrics")[1].decode()
            findings = _findings_api(daemon, "")[1].decode()
            assert str(link) in findings
            assert secret not in metrics and secret not in findings

    async def test_heal_writes_as_the_user(self, host_sandbox: HostSandbox, tmp_path: Path) -> None:
        """A replaced link healed by the root daemon: the new link and quarantine are the user's."""
        carol = host_sandbox.add_user()
        settings = host_settings(
            host_sandbox, tmp_path / "state", [carol], heal={"link-replaced": "heal"}
        )
        async with running_host(settings) as daemon:
            await eventually(lambda: user_ready(daemon, carol), WAIT, "ready")
            path = replace_link(carol)
            await eventually(lambda: path.is_symlink(), WAIT, "healed")
            assert path.lstat().st_uid == carol.account.uid
            quarantine = carol.home / ".local/state/provenanced/quarantine"
            (moved,) = quarantine.glob(f"*/.config/systemd/user/{UNIT}")
            assert moved.read_text() == EDITED
            assert moved.stat().st_uid == carol.account.uid
            assert quarantine.stat().st_uid == carol.account.uid

    async def test_managers_that_come_and_go(
        self, host_sandbox: HostSandbox, tmp_path: Path
    ) -> None:
        """A manager started later is followed; one that leaves is dropped with its findings."""
        dave = host_sandbox.add_user()
        erin = host_sandbox.add_user(boot=False)
        path = replace_link(erin)
        async with running_host(
            host_settings(host_sandbox, tmp_path / "state", [dave, erin])
        ) as daemon:
            await eventually(lambda: user_ready(daemon, dave), WAIT, "ready")
            assert daemon.engine(erin.account.name) is None
            erin.start()
            await eventually(
                lambda: user_has(daemon, erin, FindingKind.LINK_REPLACED, path),
                WAIT,
                "late manager",
            )
            assert erin.account.name in {s["user"] for s in _samples(daemon, "provenanced_ready")}
            host_sandbox.remove_user(erin)
            await eventually(lambda: daemon.engine(erin.account.name) is None, WAIT, "dropped")
            users = {s["user"] for s in _samples(daemon, "provenanced_finding")}
            assert erin.account.name not in users
            assert _findings_api(daemon, f"?user={erin.account.name}")[0] == 404
            assert user_ready(daemon, dave)

    async def test_a_frozen_manager_does_not_delay_another_user(
        self, host_sandbox: HostSandbox, tmp_path: Path
    ) -> None:
        """One user's manager SIGSTOPped: another user's drift is still detected."""
        frank, grace = host_sandbox.add_user(), host_sandbox.add_user()
        async with running_host(
            host_settings(host_sandbox, tmp_path / "state", [frank, grace])
        ) as daemon:
            await eventually(
                lambda: user_ready(daemon, frank) and user_ready(daemon, grace), WAIT, "ready"
            )
            os.kill(frank.manager_pid, signal.SIGSTOP)
            try:
                replace_link(frank)  # its re-read now waits on a manager that never answers
                path = replace_link(grace)
                await eventually(
                    lambda: user_has(daemon, grace, FindingKind.LINK_REPLACED, path),
                    WAIT,
                    "detected",
                )
            finally:
                os.kill(frank.manager_pid, signal.SIGCONT)


class TestHostJournal:
    """Entries about a user's units name the user, and carry what their journalctl matches."""

    async def test_drift_entries_carry_the_user_fields(
        self, journald: Journald | None, host_sandbox: HostSandbox, tmp_path: Path
    ) -> None:
        """PROVENANCED_USER, OBJECT_UID and OBJECT_SYSTEMD_USER_UNIT on the real journald."""
        heidi = host_sandbox.add_user()
        async with running_host(host_settings(host_sandbox, tmp_path / "state", [heidi])) as daemon:
            await eventually(lambda: user_ready(daemon, heidi), WAIT, "ready")
            path = replace_link(heidi)
            await eventually(
                lambda: user_has(daemon, heidi, FindingKind.LINK_REPLACED, path), WAIT, "detected"
            )

        def entry() -> dict[str, str] | None:
            out = subprocess.run(
                [
                    "journalctl",
                    "--no-pager",
                    "-o",
                    "json",
                    f"PROVENANCED_USER={heidi.account.name}",
                ],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            ).stdout
            entries = [json.loads(line) for line in out.splitlines() if line.strip()]
            return next((e for e in entries if e.get("PROVENANCED_KIND") == "link-replaced"), None)

        found = wait_until(entry, WAIT, message="the drift entry in the journal")
        assert found["OBJECT_UID"] == str(heidi.account.uid)
        assert found["OBJECT_SYSTEMD_USER_UNIT"] == found["USER_UNIT"] == UNIT
        assert found["PROVENANCED_PATH"] == str(path)


class TestLogindSource:
    """logind is asked first when a system bus answers; a bus without logind changes nothing."""

    async def test_a_bus_without_logind_leaves_the_runtime_dirs_in_charge(
        self, tmp_path: Path
    ) -> None:
        """A real dbus-daemon with no login1 on it: ListUsers fails, users() is None."""
        socket_path = tmp_path / "system_bus_socket"
        bus = await asyncio.create_subprocess_exec(
            "dbus-daemon",
            "--session",
            "--nofork",
            f"--address=unix:path={socket_path}",
            stdout=asyncio.subprocess.DEVNULL,
        )
        try:
            await eventually(socket_path.exists, WAIT, "the bus socket")
            logind = Logind(f"unix:path={socket_path}", timeout=5.0)
            try:
                assert await logind.users() is None
            finally:
                await logind.close()
        finally:
            bus.terminate()
            async with asyncio.timeout(10):
                await bus.wait()

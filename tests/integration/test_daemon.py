"""The event-driven daemon against a real sandboxed user manager: detect, reload, heal, recover."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import pytest

from daemonkit import Running, eventually, settings_for, start_daemon
from provenanced.config import ProvenanceSettings, Settings
from provenanced.core.layered import LayeredMap
from provenanced.daemon.service import Daemon
from provenanced.model import FileKind, FindingKind
from provenanced.sandbox import Sandbox, build_generation, example_units

pytestmark = pytest.mark.integration

WEB = "podman-web.service"


@pytest.fixture
async def daemon(fresh_sandbox: Sandbox) -> AsyncIterator[Running]:
    async with start_daemon(fresh_sandbox) as running:
        yield running


def _base(mapping: Mapping[str, object]) -> Mapping[str, object]:
    return mapping.base if isinstance(mapping, LayeredMap) else mapping


class TestDetection:
    async def test_clean_tree_is_clean_and_ready(self, daemon: Running) -> None:
        """After the first full audit the daemon is ready, connected and sees no drift."""
        assert daemon.engine.connected.is_set()
        assert daemon.findings() == set()
        assert daemon.engine.status.ready

    async def test_link_replaced_then_restored(
        self, fresh_sandbox: Sandbox, daemon: Running
    ) -> None:
        """A managed link replaced by a regular file is found, and resolved when the link is back."""
        path = fresh_sandbox.config_dir / WEB
        target = os.readlink(path)
        content = path.read_bytes()
        path.unlink()
        path.write_bytes(content)
        await eventually(lambda: daemon.has(FindingKind.LINK_REPLACED, path))
        path.unlink()
        path.symlink_to(target)
        await eventually(lambda: not daemon.has(FindingKind.LINK_REPLACED, path))
        assert daemon.sample("provenanced_findings_resolved_total", kind="link-replaced") >= 1

    async def test_a_change_layers_over_the_last_observation(
        self, fresh_sandbox: Sandbox, daemon: Running
    ) -> None:
        """A change shares the last observation's maps instead of copying them, and leaves it as
        it was: the HTTP thread may still be reading it."""
        before = daemon.engine.state.observation
        assert before is not None
        facts_before, units_before = dict(before.facts), dict(before.units)
        path = fresh_sandbox.config_dir / WEB
        content = path.read_bytes()
        path.unlink()
        path.write_bytes(content)
        await eventually(lambda: daemon.has(FindingKind.LINK_REPLACED, path))
        after = daemon.engine.state.observation
        # Layered over the same base as before (``before`` may itself be a layer over it).
        assert isinstance(after.facts, LayeredMap) and after.facts.base is _base(before.facts)
        assert isinstance(after.units, LayeredMap) and after.units.base is _base(before.units)
        assert after.facts[str(path)].kind is FileKind.FILE
        assert dict(before.facts) == facts_before and dict(before.units) == units_before
        assert before.facts[str(path)].kind is FileKind.SYMLINK

    async def test_new_dropin_directory_is_watched(
        self, fresh_sandbox: Sandbox, daemon: Running
    ) -> None:
        """A drop-in directory created after start is watched and its files audited."""
        dropin = fresh_sandbox.config_dir / "backup.service.d" / "late.conf"
        dropin.parent.mkdir()
        dropin.write_text("[Service]\nEnvironment=LATE=1\n")
        await eventually(lambda: daemon.has(FindingKind.UNMANAGED_DROPIN, dropin))


class TestLinkedUnitDirectory:
    async def test_a_unit_directory_linked_into_a_managed_root(
        self, fresh_sandbox: Sandbox
    ) -> None:
        """Home Manager's ``recursive = false`` links a whole unit directory into the store:
        its files are managed, a retarget is seen at once, a real directory is not vouched for."""
        sandbox = fresh_sandbox
        settings = settings_for(sandbox, need_daemon_reload="flag")
        settings = settings.model_copy(
            update={"provenance": ProvenanceSettings(managed_roots=(str(sandbox.store),))}
        )
        first, second = sandbox.store / "dddd-units", sandbox.store / "eeee-units"
        for directory, env in ((first, "1"), (second, "2")):
            directory.mkdir()
            (directory / "linked.service").write_text(
                f"[Service]\nExecStart=/bin/sleep infinity\nEnvironment=V={env}\n"
            )
        linked = sandbox.admin_dir / "linked.service"
        async with start_daemon(sandbox, settings) as running:
            shutil.rmtree(sandbox.admin_dir, ignore_errors=True)
            sandbox.admin_dir.symlink_to(first)
            sandbox.daemon_reload()
            sandbox.systemctl("start", "linked.service")  # loaded, so a retarget makes it stale
            await eventually(
                lambda: (
                    running.engine.state.observation is not None
                    and "linked.service" in running.engine.state.observation.units
                )
            )
            assert running.findings() == set()
            # Retargeted like an activation would (rename over the link): stale at once.
            replacement = sandbox.admin_dir.with_name("user.new")
            replacement.symlink_to(second)
            replacement.rename(sandbox.admin_dir)
            await eventually(lambda: running.has(FindingKind.STALE_LOAD, linked))
            assert not running.has(FindingKind.UNMANAGED_UNIT, linked)
            # A real directory with the same file: nothing vouches for it.
            sandbox.admin_dir.unlink()
            sandbox.admin_dir.mkdir()
            shutil.copy(second / "linked.service", linked)
            await eventually(lambda: running.has(FindingKind.UNMANAGED_UNIT, linked))


class TestReload:
    async def test_fragment_edit_is_reloaded(self, fresh_sandbox: Sandbox) -> None:
        """An edited fragment gives stale-load; the daemon reloads and NeedDaemonReload clears."""
        unit = fresh_sandbox.config_dir / "local.service"
        unit.write_text("[Service]\nExecStart=/bin/sleep infinity\n")
        fresh_sandbox.daemon_reload()
        fresh_sandbox.systemctl("start", "local.service")
        async with start_daemon(fresh_sandbox) as running:
            unit.write_text("[Service]\nExecStart=/bin/sleep infinity\nEnvironment=X=1\n")
            await eventually(
                lambda: (
                    running.sample(
                        "provenanced_reloads_total", trigger="need-daemon-reload", result="ok"
                    )
                    >= 1
                )
            )
            assert (
                fresh_sandbox.show("local.service", "NeedDaemonReload")["NeedDaemonReload"] == "no"
            )
            await eventually(lambda: not running.has(FindingKind.STALE_LOAD, unit))

    async def test_daemon_reload_drops_no_unit(self, fresh_sandbox: Sandbox) -> None:
        """A reload frees and re-creates every unit (UnitRemoved for each): none is dropped."""
        async with start_daemon(fresh_sandbox, need_daemon_reload="flag") as running:
            engine = running.engine
            dropped: list[int] = []
            publish = engine.publish

            def watch_publish() -> None:
                # Every state the daemon publishes must still know the unit.
                publish()
                if (
                    engine.state.observation is not None
                    and "backup.service" not in engine.state.observation.units
                ):
                    dropped.append(engine.resyncs)

            engine.publish = watch_publish  # type: ignore[method-assign]
            dropin = fresh_sandbox.config_dir / "backup.service.d" / "stale.conf"
            dropin.parent.mkdir()
            for edit in range(5):
                resyncs = engine.resyncs
                # An edit keeps the daemon busy re-reading when the reload starts, and the reload
                # runs in a thread so that the loop hears its signals as they come.
                dropin.write_text(f"[Service]\nEnvironment=STALE={edit}\n")
                await asyncio.to_thread(fresh_sandbox.daemon_reload)
                await eventually(lambda r=resyncs: engine.resyncs > r)  # type: ignore[misc]
            assert dropped == []
            assert running.has(FindingKind.UNMANAGED_DROPIN, dropin)

    async def test_retarget_with_older_mtime_is_stale(self, fresh_sandbox: Sandbox) -> None:
        """A link moved to another store file with an older mtime fools systemd, not the daemon."""
        async with start_daemon(fresh_sandbox, need_daemon_reload="flag") as running:
            files = example_units()
            key = ".config/systemd/user/podman-web.service"
            files[key] = (
                files[key].replace("WEB", "WEB").replace("Restart=on-failure", "Restart=always")
            )
            gen = build_generation(fresh_sandbox.store, files, name_hint="next")
            new_target = gen.home_files / key
            os.utime(new_target.resolve(), (1_000_000, 1_000_000))
            link = fresh_sandbox.config_dir / WEB
            tmp = link.with_name(".tmp-link")
            tmp.symlink_to(new_target)
            tmp.rename(link)
            await eventually(lambda: running.has(FindingKind.STALE_LOAD, link))
            assert fresh_sandbox.show(WEB, "NeedDaemonReload")["NeedDaemonReload"] == "no"

    async def test_reload_deferred_while_home_manager_activates(
        self, fresh_sandbox: Sandbox, tmp_path: Path
    ) -> None:
        """No reload while a home-manager-*.service is activating; it happens once that finishes."""
        flag = tmp_path / "release"
        hm = fresh_sandbox.config_dir / "home-manager-test.service"
        hm.write_text(
            "[Service]\nType=oneshot\n"
            f"ExecStart=/bin/sh -c 'while [ ! -e {flag} ]; do sleep 0.05; done'\n"
        )
        local = fresh_sandbox.config_dir / "local.service"
        local.write_text("[Service]\nExecStart=/bin/sleep infinity\n")
        fresh_sandbox.daemon_reload()
        fresh_sandbox.systemctl("start", "local.service")
        async with start_daemon(fresh_sandbox) as running:
            fresh_sandbox.systemctl("start", "--no-block", "home-manager-test.service")
            local.write_text("[Service]\nExecStart=/bin/sleep infinity\nEnvironment=Y=2\n")
            await eventually(
                lambda: (
                    running.sample(
                        "provenanced_reloads_total", trigger="need-daemon-reload", result="deferred"
                    )
                    >= 1
                )
            )
            assert (
                running.sample(
                    "provenanced_reloads_total", trigger="need-daemon-reload", result="ok"
                )
                == 0
            )
            flag.touch()
            await eventually(
                lambda: (
                    running.sample(
                        "provenanced_reloads_total", trigger="need-daemon-reload", result="ok"
                    )
                    >= 1
                )
            )


class TestHeal:
    async def test_heal_link_replaced_quarantines_byte_identical(
        self, fresh_sandbox: Sandbox
    ) -> None:
        """Heal moves the replaced file to quarantine unchanged and puts the managed link back."""
        async with start_daemon(fresh_sandbox, heal={"link-replaced": "heal"}) as running:
            path = fresh_sandbox.config_dir / "backup.timer"
            expected_target = os.readlink(path)
            payload = b"[Timer]\nOnCalendar=hourly\n# hand edit\n"
            path.unlink()
            path.write_bytes(payload)
            await eventually(lambda: path.is_symlink() and os.readlink(path) == expected_target)
            sidecars = list((fresh_sandbox.state_dir / "quarantine").rglob("*.provenanced.json"))
            assert len(sidecars) == 1
            meta = json.loads(sidecars[0].read_text())
            assert meta["original_path"] == str(path)
            quarantined = Path(str(sidecars[0]).removesuffix(".provenanced.json"))
            assert quarantined.read_bytes() == payload
            # The heal runs on the daemon's I/O thread: it is counted once it has returned.
            await eventually(
                lambda: (
                    running.sample("provenanced_heals_total", kind="link-replaced", result="ok")
                    == 1
                )
            )
            await eventually(lambda: not running.has(FindingKind.LINK_REPLACED, path))


class TestRecovery:
    async def test_manager_restart_resyncs(self, fresh_sandbox: Sandbox) -> None:
        """The manager killed and started again: the daemon reconnects and sees drift made meanwhile."""
        async with start_daemon(fresh_sandbox, manager={"reconnect_max_delay": 0.5}) as running:
            resyncs = running.engine.resyncs
            fresh_sandbox.restart_manager()
            extra = fresh_sandbox.config_dir / "extra.service"
            extra.write_text("[Service]\nExecStart=/bin/true\n")
            await eventually(
                lambda: running.engine.resyncs > resyncs and running.engine.connected.is_set(), 30
            )
            await eventually(lambda: running.has(FindingKind.UNMANAGED_UNIT, extra), 30)
            assert running.sample("provenanced_dbus_reconnects_total") >= 1

    async def test_failed_connection_attempts_are_counted(self, tmp_path: Path) -> None:
        """With no manager at the address, every failed attempt counts as a reconnect."""
        settings = Settings(
            state_dir=tmp_path / "state",
            manager={"bus_address": f"unix:path={tmp_path}/no-bus", "reconnect_max_delay": 0.1},
            metrics={"listen": "127.0.0.1:0"},
            log={"format": "logfmt", "level": "error"},
        )
        env = {"HOME": str(tmp_path), "XDG_RUNTIME_DIR": str(tmp_path)}
        daemon = Daemon(settings, env=env)
        stop = asyncio.Event()
        task = asyncio.create_task(daemon.run(stop), name="test.daemon")
        try:
            sample = daemon.telemetry.registry.get_sample_value
            await eventually(lambda: (sample("provenanced_dbus_reconnects_total") or 0) >= 3)
            assert not daemon.engine.connected.is_set()
        finally:
            stop.set()
            async with asyncio.timeout(15):
                await task

    async def test_daemon_reexec_keeps_following(self, fresh_sandbox: Sandbox) -> None:
        """After daemon-reexec the daemon still hears the manager and still detects drift."""
        # "flag" keeps the stale-load open instead of reloading it away before it is seen.
        async with start_daemon(fresh_sandbox, need_daemon_reload="flag") as running:
            reconnects = running.sample("provenanced_dbus_reconnects_total")
            fresh_sandbox.systemctl("daemon-reexec")
            # The re-executed manager drops our connection: wait for the new one, not the old.
            await eventually(
                lambda: (
                    running.sample("provenanced_dbus_reconnects_total") > reconnects
                    and running.engine.connected.is_set()
                ),
                30,
            )
            resyncs = running.engine.resyncs
            fresh_sandbox.daemon_reload()
            await eventually(lambda: running.engine.resyncs > resyncs, 30)
            path = fresh_sandbox.config_dir / WEB
            edited = path.read_text() + "Environment=EDITED=1\n"
            path.unlink()
            path.write_text(edited)
            await eventually(lambda: running.has(FindingKind.LINK_REPLACED, path))
            # Only the new manager knows this: NeedDaemonReload=yes for the edited unit.
            await eventually(
                lambda: any(
                    f.kind is FindingKind.STALE_LOAD
                    and f.path == str(path)
                    and f.detail.startswith("NeedDaemonReload=yes")
                    for f in running.engine.status.findings
                )
            )

    async def test_inotify_overflow_resyncs(self, fresh_sandbox: Sandbox) -> None:
        """With a tiny kernel queue, a burst overflows it; a full resync still finds the truth."""
        knob = Path("/proc/sys/fs/inotify/max_queued_events")
        old = knob.read_text()
        knob.write_text("8\n")
        try:
            async with start_daemon(fresh_sandbox) as running:
                # A burst with no await in between: the kernel queue overflows before we read it.
                for index in range(64):
                    (fresh_sandbox.config_dir / f"extra-{index}.service").write_text(
                        "[Service]\nExecStart=/bin/true\n"
                    )
                await eventually(lambda: running.sample("provenanced_inotify_overflows_total") >= 1)
                await eventually(
                    lambda: sum(1 for k in running.findings() if k[0] == "unmanaged-unit") == 64
                )
        finally:
            knob.write_text(old)


ONESHOT = "[Service]\nType=oneshot\nExecStart={}\n"


def unverified(running: Running, unit: str) -> str | None:
    """The detail of the unit's open job-unverified finding, if one is open."""
    for finding in running.engine.status.findings:
        if finding.kind is FindingKind.JOB_UNVERIFIED and finding.unit == unit:
            return finding.detail
    return None


def write_oneshot(sandbox: Sandbox, name: str, unit_section: str, *, timer: bool) -> None:
    """A oneshot that never ran; with ``timer`` a started timer keeps it loaded between jobs."""
    (sandbox.config_dir / name).write_text(
        f"[Unit]\n{unit_section}\n" + ONESHOT.format("/bin/true")
    )
    if timer:
        (sandbox.config_dir / name.replace(".service", ".timer")).write_text(
            "[Timer]\nOnCalendar=daily\n"
        )
    sandbox.daemon_reload()
    if timer:
        sandbox.systemctl("start", name.replace(".service", ".timer"))


async def restart(sandbox: Sandbox, unit: str) -> int:
    """`systemctl --user restart`, off the loop the daemon runs on; its exit code."""
    done = await asyncio.to_thread(sandbox.systemctl, "restart", unit, check=False)
    return done.returncode


class TestJobVerification:
    @pytest.mark.parametrize("transport", ["private", "bus"])
    async def test_never_run_unit_whose_condition_fails(
        self, fresh_sandbox: Sandbox, tmp_path: Path, transport: str
    ) -> None:
        """A plain restart of a oneshot that never ran exits 0 while its condition fails: the
        unit has no InvocationID, yet job-unverified opens; it closes once the unit runs."""
        flag = tmp_path / "input"
        unit = "never-ran.service"
        write_oneshot(fresh_sandbox, unit, f"ConditionPathExists={flag}", timer=True)
        address = {"bus_address": fresh_sandbox.bus_address} if transport == "bus" else {}
        async with start_daemon(fresh_sandbox, settings_for(fresh_sandbox, address)) as running:
            assert await restart(fresh_sandbox, unit) == 0
            await eventually(lambda: unverified(running, unit), what="job-unverified opened")
            assert "ConditionResult=no" in (unverified(running, unit) or "")
            assert running.sample("provenanced_jobs_unverified_total") == 1
            flag.touch()
            assert await restart(fresh_sandbox, unit) == 0
            await eventually(lambda: unverified(running, unit) is None, what="it closed")

    async def test_unloaded_right_after_a_failed_condition(self, fresh_sandbox: Sandbox) -> None:
        """Nothing references the unit, so the manager unloads it as its job ends and a read
        finds a blank copy; the signals around the job still show the failed condition."""
        unit = "unreferenced.service"
        write_oneshot(fresh_sandbox, unit, "ConditionPathExists=/nonexistent/input", timer=False)
        async with start_daemon(fresh_sandbox) as running:
            assert await restart(fresh_sandbox, unit) == 0
            await eventually(lambda: unverified(running, unit), what="job-unverified opened")

    async def test_unloaded_after_a_clean_run_is_not_a_failure(
        self, fresh_sandbox: Sandbox
    ) -> None:
        """A oneshot that ran OK and was unloaded reads back blank (ConditionResult=no, no
        InvocationID, timestamps 0): missing evidence opens nothing."""
        clean, failing = "ran-and-gone.service", "barrier.service"
        write_oneshot(fresh_sandbox, clean, "Description=runs fine", timer=False)
        write_oneshot(fresh_sandbox, failing, "ConditionPathExists=/nonexistent/x", timer=True)
        async with start_daemon(fresh_sandbox) as running:
            assert await restart(fresh_sandbox, clean) == 0
            assert fresh_sandbox.show(clean, "InvocationID", "ConditionTimestampMonotonic") == {
                "InvocationID": "",
                "ConditionTimestampMonotonic": "0",
            }
            # Jobs are judged in the order they end: once the later one is, the first was too.
            assert await restart(fresh_sandbox, failing) == 0
            await eventually(lambda: unverified(running, failing), what="the later job judged")
            assert unverified(running, clean) is None
            assert running.sample("provenanced_jobs_unverified_total") == 1


def restart_verify(
    sandbox: Sandbox, unit: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "provenanced", "restart", "--verify", unit],
        env={**sandbox.env, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


class TestRestartVerify:
    @pytest.mark.parametrize(
        ("definition", "systemctl_code", "code", "says"),
        [
            pytest.param(
                "[Unit]\nConditionPathExists=/nonexistent/flag\n" + ONESHOT.format("/bin/true"),
                0,
                1,
                "condition",
                id="condition-failed",
            ),
            pytest.param(ONESHOT.format("/bin/sh -c 'exit 3'"), 1, 1, "status 3", id="exit-status"),
            # Nothing references it, so the manager unloads it right after the job; the pinned
            # reference keeps its result readable.
            pytest.param(ONESHOT.format("/bin/true"), 0, 0, "verified", id="unreferenced-success"),
        ],
    )
    def test_verdict(
        self, sandbox: Sandbox, definition: str, systemctl_code: int, code: int, says: str
    ) -> None:
        """systemctl restart says 0 for all of these; restart --verify tells them apart."""
        name = f"verify-{code}-{says.split()[0]}.service"
        (sandbox.config_dir / name).write_text(definition)
        sandbox.daemon_reload()
        assert sandbox.systemctl("restart", name, check=False).returncode == systemctl_code
        result = restart_verify(sandbox, name)
        assert result.returncode == code, result.stdout + result.stderr
        assert says in (result.stdout + result.stderr).lower()

    @pytest.mark.parametrize(
        ("name", "unit_section", "code", "says"),
        [
            pytest.param("unpinned-1.service", "Description=x", 0, "verified", id="clean-run"),
            pytest.param(
                "unpinned-2.service",
                "ConditionPathExists=/nonexistent/flag",
                1,
                "a start condition failed",
                id="condition",
            ),
            pytest.param(
                "unpinned-3.service",
                "AssertPathExists=/nonexistent/flag",
                1,
                "a start assertion failed",
                id="assert",
            ),
        ],
    )
    def test_verdict_on_a_unit_nothing_can_pin(
        self, sandbox: Sandbox, name: str, unit_section: str, code: int, says: str
    ) -> None:
        """Over the private socket alone the never-run, unreferenced oneshot cannot be pinned: it
        is unloaded as its job ends and reads back blank; the signals around the job still tell."""
        write_oneshot(sandbox, name, unit_section, timer=False)
        private = {"PROVENANCED_MANAGER__BUS_ADDRESS": f"unix:path={sandbox.private_socket}"}
        result = restart_verify(sandbox, name, private)
        assert result.returncode == code, result.stdout + result.stderr
        assert says in (result.stdout + result.stderr).lower()
        assert sandbox.show(name, "ConditionTimestampMonotonic") == {
            "ConditionTimestampMonotonic": "0"
        }

    def test_timer_triggered_oneshot_is_verified(self, sandbox: Sandbox) -> None:
        """The Home Manager backup oneshot ran and exited 0: verified."""
        result = restart_verify(sandbox, "backup.service")
        assert result.returncode == 0, result.stderr


class TestSignals:
    def test_sigterm_exits_cleanly(self, fresh_sandbox: Sandbox) -> None:
        """`provenanced run` stops on SIGTERM with exit 0."""
        env = {**fresh_sandbox.env, "PROVENANCED_METRICS__LISTEN": "127.0.0.1:0"}
        proc = subprocess.Popen(
            [sys.executable, "-m", "provenanced", "run"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                if "manager.connected" in line:
                    break
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=15) == 0
        finally:
            if proc.poll() is None:
                proc.kill()

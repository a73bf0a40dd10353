"""The file system misbehaves: unit directories vanish, links loop, names are hostile."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest

from daemonkit import (
    WAIT,
    Running,
    eventually,
    http_get,
    parse_metrics,
    poll,
    start_daemon,
    unit_file,
)
from provenanced.model import FindingKind
from provenanced.sandbox import Sandbox, activate
from provenanced.sinks import journal as ids

pytestmark = pytest.mark.fault

K = FindingKind


def _managed_links(sandbox: Sandbox) -> set[str]:
    assert sandbox.generation is not None
    return {str(sandbox.home / rel) for rel in sandbox.generation.files}


class TestUnitDirectoryDeletedAndRecreated:
    async def test_missing_then_back_and_watched_again(
        self, fresh_sandbox: Sandbox, tmp_path: Path
    ) -> None:
        """The config unit directory moved away is managed-missing; recreated, it is clean and watched again."""
        sandbox = fresh_sandbox
        async with start_daemon(sandbox, need_daemon_reload="flag") as running:
            links = _managed_links(sandbox)
            moved = tmp_path / "user-units-moved-away"
            sandbox.config_dir.rename(moved)
            await eventually(
                lambda: running.paths(K.MANAGED_MISSING) == links, what="every link missing"
            )
            assert running.alive()
            # Recreated as a new, empty directory (a new inode), then Home Manager relinks it.
            sandbox.config_dir.mkdir()
            assert sandbox.generation is not None
            activate(sandbox.home, sandbox.generation)
            await eventually(lambda: running.paths(K.MANAGED_MISSING) == set(), what="relinked")
            await eventually(lambda: running.findings() == set(), what="a clean tree")
            # The new directory is watched: with a 15-minute backstop, only inotify can see this.
            extra = unit_file(sandbox.config_dir, "after-recreate.service")
            await eventually(lambda: running.has(K.UNMANAGED_UNIT, extra), timeout=10)
            assert running.sample("provenanced_degraded") == 0
            # Nothing was lost: the old directory and its links are where the test put them.
            assert {p.name for p in moved.iterdir()} >= {"podman-web.service", "backup.timer"}

    async def test_parent_directory_deleted_and_recreated(
        self, fresh_sandbox: Sandbox, tmp_path: Path
    ) -> None:
        """Removing ~/.config/systemd (the unit directory's parent) and bringing it back is followed too."""
        sandbox = fresh_sandbox
        async with start_daemon(sandbox, need_daemon_reload="flag") as running:
            parent = sandbox.config_dir.parent
            parent.rename(tmp_path / "systemd-moved-away")
            await eventually(lambda: len(running.paths(K.MANAGED_MISSING)) > 0)
            sandbox.config_dir.mkdir(parents=True)
            extra = unit_file(sandbox.config_dir, "in-new-tree.service")
            await eventually(lambda: running.has(K.UNMANAGED_UNIT, extra), timeout=10)
            assert running.alive()


class TestSymlinkLoops:
    async def test_loops_and_long_chains_are_reported_not_fatal(
        self, fresh_sandbox: Sandbox
    ) -> None:
        """Self-loops, two-link cycles and chains past the kernel's 40 hops are findings; the daemon lives."""
        sandbox = fresh_sandbox
        units = sandbox.config_dir
        async with start_daemon(sandbox, need_daemon_reload="flag") as running:
            watches = running.sample("provenanced_inotify_watches")
            real = unit_file(units, "chain-end.service")
            (units / "self-loop.service").symlink_to("self-loop.service")
            (units / "ping.service").symlink_to("pong.service")
            (units / "pong.service").symlink_to("ping.service")
            # 45 hops exceed the kernel's limit (ELOOP); 10 hops resolve.
            for name, hops in (("long", 45), ("short", 10)):
                previous = real.name
                for index in range(hops, 0, -1):
                    link = units / f"{name}-{index}.service"
                    link.symlink_to(previous)
                    previous = link.name
            # A drop-in directory that is a link back to the unit directory: never walked into.
            (units / "loop.service.d").symlink_to(".")
            looping = {units / n for n in ("self-loop.service", "ping.service", "pong.service")}
            looping |= {units / f"long-{i}.service" for i in range(1, 46) if 45 - i + 1 > 40}
            await eventually(
                lambda: {str(p) for p in looping} <= running.paths(K.LINK_DANGLING),
                what="every looping link reported",
            )
            details = {
                f.detail for f in running.engine.status.findings if f.kind is K.LINK_DANGLING
            }
            assert all("cannot be resolved" in d for d in details), details
            resolving = {str(units / f"short-{i}.service") for i in range(1, 11)}
            await eventually(lambda: resolving <= running.paths(K.UNMANAGED_UNIT))
            assert running.alive() and running.engine.connected.is_set()
            # The link to "." was not followed: no path below it was ever audited.
            assert not any("/loop.service.d/" in f[2] for f in running.findings())
            assert running.sample("provenanced_inotify_watches") == watches
            for path in [*looping, *units.glob("long-*"), *units.glob("short-*")]:
                path.unlink(missing_ok=True)
            (units / "loop.service.d").unlink()
            real.unlink()
            await eventually(
                lambda: running.findings() == set(),
                what="clean after removal",
                state=running.findings,
            )


# Names the manager accepts (escapes, templates) and names it refuses (space, unicode, newline,
# bytes that are not UTF-8): the daemon must carry each one safely to every sink.
_ESCAPED = "foo\\x2dbar.service"
_TEMPLATE = "tpl@.service"
_INJECT = f"evil\nPRIORITY=0\nMESSAGE_ID={ids.HEAL_DONE}\nUSER_UNIT=x.service"
_HOSTILE = ("with space.service", "ünïcødé.service", _INJECT, os.fsdecode(b"bad\xff.service"))


def _journal_since(since: float) -> list[dict[str, Any]]:
    result = subprocess.run(
        [
            "journalctl",
            "--no-pager",
            "-o",
            "json",
            f"--since=@{int(since) - 1}",
            "SYSLOG_IDENTIFIER=provenanced",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=WAIT,
    )
    return [json.loads(line) for line in result.stdout.splitlines()]


def _field(entry: dict[str, Any], name: str) -> str | None:
    """A journal field as text; journalctl gives byte arrays for values that are not UTF-8."""
    value = entry.get(name)
    if isinstance(value, list):
        return os.fsdecode(bytes(value))
    return value


class TestHostileNames:
    async def test_escapes_templates_and_hostile_names(
        self, fresh_sandbox: Sandbox, journald: object
    ) -> None:
        """Every name reaches findings, metrics, the API and journald intact, and injects nothing."""
        sandbox = fresh_sandbox
        units = sandbox.config_dir
        since = time.time()
        async with start_daemon(sandbox, need_daemon_reload="flag") as running:
            # Long-running, so the manager keeps both loaded: an unloaded unit is forgotten, never re-read.
            escaped = unit_file(units, _ESCAPED, "[Service]\nExecStart=/bin/sleep infinity\n")
            dropin = units / f"{_ESCAPED}.d" / "10-extra.conf"
            dropin.parent.mkdir()
            dropin.write_text("[Service]\nEnvironment=X=1\n")
            template = unit_file(units, _TEMPLATE, "[Service]\nExecStart=/bin/sleep infinity\n")
            # No unit has such a name, but systemd reads any *.conf of a drop-in directory.
            hostile_dir = units / "absent.service.d"
            hostile_dir.mkdir()
            hostile = [hostile_dir / f"{name}.conf" for name in _HOSTILE]
            for path in hostile:
                path.write_text("[Service]\n")
            sandbox.daemon_reload()
            sandbox.systemctl("start", "tpl@in\\x2dstance.service", _ESCAPED)
            await eventually(
                lambda: {str(p) for p in (escaped, template)} <= running.paths(K.UNMANAGED_UNIT),
                what="every unit file reported",
            )
            await eventually(
                lambda: {str(p) for p in (dropin, *hostile)} <= running.paths(K.UNMANAGED_DROPIN),
                what="every drop-in reported",
            )
            assert running.alive()
            await self._manager_records_were_read(running)
            self._metrics_carry_every_path(running, [escaped, dropin, template, *hostile])
            self._api_carries_every_path(running, [escaped, dropin, template, *hostile])
        self._journal_carries_every_path(since, [escaped, template, *hostile])

    async def test_a_unit_the_manager_cannot_send_is_judged_from_its_files(
        self, fresh_sandbox: Sandbox
    ) -> None:
        """A loaded unit's drop-in named in bytes that are not UTF-8: GetAll fails, re-reads go on."""
        sandbox = fresh_sandbox
        async with start_daemon(sandbox, need_daemon_reload="flag") as running:
            unit_file(
                sandbox.config_dir, "odd.service", "[Service]\nExecStart=/bin/sleep infinity\n"
            )
            bad = sandbox.config_dir / "odd.service.d" / os.fsdecode(b"bad\xff.conf")
            bad.parent.mkdir()
            bad.write_text("[Service]\n")
            sandbox.daemon_reload()
            sandbox.systemctl("start", "odd.service")
            await eventually(lambda: running.has(K.UNMANAGED_DROPIN, bad))
            resyncs = running.engine.resyncs
            running.engine.publish()
            assert not running.engine.status.behind
            # Later changes are still seen: the daemon is not stuck retrying a failed re-read.
            other = unit_file(sandbox.config_dir, "later.service")
            await eventually(lambda: running.has(K.UNMANAGED_UNIT, other))
            assert running.engine.resyncs - resyncs <= 2

    @staticmethod
    async def _manager_records_were_read(running: Running) -> None:
        """Escaped and instance names were read over the bus (a wrong object path reads nothing)."""
        await eventually(
            lambda: (
                running.engine.state.observation is not None
                and {_ESCAPED, "tpl@in\\x2dstance.service"}
                <= set(running.engine.state.observation.units)
            )
        )
        obs = running.engine.state.observation
        assert obs is not None
        assert obs.units[_ESCAPED].load_state == "loaded"
        assert obs.units[_ESCAPED].dropin_paths[-1].endswith("/10-extra.conf")
        assert obs.units["tpl@in\\x2dstance.service"].fragment_path.endswith("/tpl@.service")

    @staticmethod
    def _metrics_carry_every_path(running: Running, paths: list[Path]) -> None:
        text = generate_latest(running.daemon.telemetry.registry).decode()
        samples = parse_metrics(text)
        labelled = {
            dict(labels)["path"] for (name, labels) in samples if name == "provenanced_finding"
        }
        for path in paths:
            expected = str(path).encode("utf-8", "backslashreplace").decode()
            assert expected in labelled
        # One sample per line: a newline in a label value is escaped, never a line break.
        for line in text.splitlines():
            assert line.startswith(("#", "provenanced_")), line

    @staticmethod
    def _api_carries_every_path(running: Running, paths: list[Path]) -> None:
        assert running.daemon.http is not None
        status, body = http_get(running.daemon.http.address, "/api/v1/findings")
        assert status == 200
        listed = {f["path"] for f in json.loads(body)["findings"]}
        assert {str(p) for p in paths} <= listed

    @staticmethod
    def _journal_carries_every_path(since: float, paths: list[Path]) -> None:
        wanted = {str(p) for p in paths}

        def detected() -> list[dict[str, Any]]:
            entries = [
                e
                for e in _journal_since(since)
                if _field(e, "MESSAGE_ID") == ids.DRIFT_DETECTED
                and _field(e, "PROVENANCED_PATH") in wanted
            ]
            return entries if {_field(e, "PROVENANCED_PATH") for e in entries} == wanted else []

        entries = poll(detected, message="a drift entry for every hostile path")
        for entry in entries:
            path = _field(entry, "PROVENANCED_PATH")
            assert path is not None
            parent = os.path.basename(os.path.dirname(path))
            unit = parent[: -len(".d")] if parent.endswith(".d") else os.path.basename(path)
            assert _field(entry, "USER_UNIT") == unit
            assert _field(entry, "PRIORITY") == "4"
            assert "\n" not in (_field(entry, "MESSAGE") or "")
        # The newline-laden name injected no entry of its own.
        roots = {os.path.dirname(p) for p in wanted}
        for entry in _journal_since(since):
            if os.path.dirname(_field(entry, "PROVENANCED_PATH") or "") in roots:
                assert _field(entry, "MESSAGE_ID") != ids.HEAL_DONE
                assert _field(entry, "PRIORITY") != "0"

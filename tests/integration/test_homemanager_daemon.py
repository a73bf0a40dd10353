"""The daemon through real Home Manager switches: silent while one runs, still catching drift.

One sandboxed manager for the module; each switch goes to the other generation of a release
(`example_switch`: one unit changed, one kept, one removed, one added), in each form the
sandbox replays. The daemon runs in-process; what it publishes is sampled every 10 ms (the
value /api/v1/findings serves), its journal entries are read back with journalctl.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import pytest
from systemd import journal

from daemonkit import Running, eventually, settings_for, start_daemon
from helpers import wait_until
from provenanced.config import ProvenanceSettings, Settings
from provenanced.model import FindingKind
from provenanced.sandbox import (
    FORMS,
    RELEASES,
    Form,
    Generation,
    Options,
    Release,
    Sandbox,
    auto_upgrade_units,
    build_generation,
    example_switch,
    prepare_switch,
    read_journal,
    run_switch,
)
from provenanced.sinks.journal import DRIFT_DETECTED

pytestmark = pytest.mark.integration

_CFG = ".config/systemd/user"
_LINK_KINDS = ("link-replaced", "link-retargeted", "link-dangling", "managed-missing")


@dataclass
class Home:
    """The module's sandbox, its generations per release, and which one is current."""

    sandbox: Sandbox
    generations: dict[Release, tuple[Generation, Generation]]
    current: Generation
    on_second: bool = False  # the current generation has example_switch's second file set

    def next_for(self, release: Release) -> Generation:
        """The generation of ``release`` that differs from the current one as example_switch does."""
        first, second = self.generations[release]
        return first if self.on_second else second

    def switched(self, gen: Generation) -> None:
        self.current, self.on_second = gen, not self.on_second


@pytest.fixture(scope="module")
def home(journald: object) -> Iterator[Home]:
    with Sandbox() as sandbox:
        extra = auto_upgrade_units(sandbox)
        first_files, second_files = example_switch()
        generations = {
            release: (
                build_generation(sandbox.store, {**first_files, **extra}, "a", release),
                build_generation(sandbox.store, {**second_files, **extra}, "b", release),
            )
            for release in RELEASES
        }
        first = generations["25.11"][0]
        run_switch(sandbox, first, "standalone")
        yield Home(sandbox, generations, first)


@dataclass
class Watch:
    """Everything the daemon published while it was watched, and when the watch began."""

    seen: set[tuple[str, str, str]] = field(default_factory=set)
    samples: int = 0
    started_usec: int = field(default_factory=lambda: time.time_ns() // 1000)


@contextlib.asynccontextmanager
async def sampling(running: Running) -> AsyncIterator[Watch]:
    """Sample the published findings every 10 ms until the block ends."""
    watch = Watch()

    async def sample() -> None:
        while True:
            watch.seen |= running.findings()
            watch.samples += 1
            await asyncio.sleep(0.01)

    task = asyncio.create_task(sample(), name="test.sample")
    try:
        yield watch
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        watch.seen |= running.findings()


def drift_entries(sandbox: Sandbox, since_usec: int) -> list[dict[str, str]]:
    """This process's drift-detected entries about the sandbox since then, once journald has all."""
    marker = uuid.uuid4().hex
    journal.send(MESSAGE="sync", PROVENANCED_TEST=marker)
    wait_until(lambda: read_journal(f"PROVENANCED_TEST={marker}"), 30, message="journal in sync")
    entries = read_journal(f"MESSAGE_ID={DRIFT_DETECTED}", f"_PID={os.getpid()}")
    return [
        e
        for e in entries
        if int(e["__REALTIME_TIMESTAMP"]) >= since_usec
        and e.get("PROVENANCED_PATH", "").startswith(str(sandbox.root))
    ]


async def settled(running: Running, gen: Generation) -> None:
    """The daemon judges against ``gen`` and holds nothing back."""
    engine = running.engine
    await eventually(
        lambda: (
            engine.state.generation.path == str(gen.path)
            and not engine.status.activation_in_progress
        ),
        what=f"the daemon follows {gen.path.name}",
        state=lambda: (engine.state.generation.path, engine.status.activation_in_progress),
    )


async def switch(
    home: Home, gen: Generation, form: Form, options: Options, prepared: bool = True
) -> None:
    await asyncio.to_thread(run_switch, home.sandbox, gen, form, options, prepared=prepared)
    home.switched(gen)


def settings(sandbox: Sandbox, **policy: object) -> Settings:
    """The daemon's default policy (reloads included), the sandbox's store as managed root."""
    return settings_for(sandbox, **policy).model_copy(
        update={"provenance": ProvenanceSettings(managed_roots=(str(sandbox.store),))}
    )


def reloads(running: Running) -> float:
    return sum(
        running.sample("provenanced_reloads_total", trigger=trigger, result=result)
        for trigger in ("need-daemon-reload", "content-hash")
        for result in ("ok", "failed")
    )


class TestCleanSwitch:
    @pytest.mark.parametrize("form", FORMS)
    @pytest.mark.parametrize("release", RELEASES)
    async def test_silent_through_the_switch(
        self, home: Home, release: Release, form: Form
    ) -> None:
        """No finding published, no drift entry, no reload of its own, during and after."""
        gen = home.next_for(release)
        options = Options()
        prepare_switch(home.sandbox, gen, form, options)
        async with start_daemon(home.sandbox, settings(home.sandbox)) as running:
            await eventually(lambda: not running.findings(), what="a clean start")
            before = reloads(running)
            async with sampling(running) as watch:
                await switch(home, gen, form, options)
                await settled(running, gen)
                during = reloads(running) - before
            assert watch.seen == set()
            assert during == 0
            assert drift_entries(home.sandbox, watch.started_usec) == []
        show = home.sandbox.show
        removed = "old-sync.service" if home.on_second else "new-sync.service"
        assert show(removed, "LoadState")["LoadState"] == "not-found"


class TestDuringASwitch:
    async def test_heal_never_brings_a_removed_unit_back(self, home: Home) -> None:
        """With heal on every link kind, the unit the new generation removed stays removed."""
        gen = home.next_for("25.11")
        removed = "old-sync.service" if not home.on_second else "new-sync.service"
        options = Options(install_seconds=0.5, entries_seconds=0.5)
        heal = dict.fromkeys(_LINK_KINDS, "heal")
        async with start_daemon(home.sandbox, settings(home.sandbox, heal=heal)) as running:
            async with sampling(running) as watch:
                await switch(home, gen, "standalone", options)
                await settled(running, gen)
            assert watch.seen == set()
            assert (
                running.sample("provenanced_heals_total", kind="managed-missing", result="ok") == 0
            )
        assert not os.path.lexists(home.sandbox.home / _CFG / removed)
        assert home.sandbox.show(removed, "LoadState")["LoadState"] == "not-found"

    @pytest.mark.parametrize("release", RELEASES)
    async def test_no_reload_of_its_own_while_units_wait_for_sd_switch(
        self, home: Home, release: Release
    ) -> None:
        """Stale loads open for a second between the links and sd-switch: the daemon waits for
        the activation's own daemon-reload instead of issuing one past its quiet window."""
        gen = home.next_for(release)
        options = Options(entries_seconds=1.0)
        async with start_daemon(home.sandbox, settings(home.sandbox)) as running:
            before = reloads(running)
            await switch(home, gen, "standalone", options)
            during = reloads(running) - before
            await settled(running, gen)
            assert during == 0
            assert running.findings() == set()

    @pytest.mark.parametrize("where", ["unit-dir", "admin-dropin"])
    async def test_drift_injected_mid_switch_is_reported_once_after_it(
        self, home: Home, where: str
    ) -> None:
        """A file dropped in while the links move is reported once, after the activation."""
        gen = home.next_for("25.11")
        sandbox = home.sandbox
        path = (
            sandbox.home / _CFG / f"stray-{uuid.uuid4().hex[:8]}.service"
            if where == "unit-dir"
            else sandbox.admin_dir / "backup.service.d" / f"{uuid.uuid4().hex[:8]}.conf"
        )
        kind = FindingKind.UNMANAGED_UNIT if where == "unit-dir" else FindingKind.UNMANAGED_DROPIN
        options = Options(install_seconds=1.0)
        async with start_daemon(sandbox, settings(sandbox)) as running:
            async with sampling(running) as watch:
                switching = asyncio.create_task(switch(home, gen, "standalone", options))
                new_home = sandbox.home / ".local/state/home-manager/gcroots/new-home"
                await eventually(lambda: new_home.is_symlink() or switching.done())
                assert not switching.done(), "the activation ended before the drift was dropped"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("[Service]\nExecStart=/bin/true\n")
                await switching
                await settled(running, gen)
                await eventually(lambda: running.has(kind, path), what="the drift reported")
            try:
                assert {p for _, _, p in watch.seen} == {str(path)}
                entries = [
                    e
                    for e in drift_entries(sandbox, watch.started_usec)
                    if e["PROVENANCED_PATH"] == str(path)
                ]
                assert len(entries) == 1
            finally:
                path.unlink()
                with contextlib.suppress(OSError):
                    path.parent.rmdir()

    async def test_a_stuck_activation_is_judged_after_the_bound(self, home: Home) -> None:
        """new-home left behind: findings wait for the bound, then are judged and flagged."""
        sandbox = home.sandbox
        gcroots = sandbox.home / ".local/state/home-manager/gcroots"
        stray = sandbox.home / _CFG / f"stray-{uuid.uuid4().hex[:8]}.service"
        async with start_daemon(sandbox, settings(sandbox, activation_timeout=1.0)) as running:
            engine = running.engine
            (gcroots / "new-home").symlink_to(home.next_for("25.11").path)
            try:
                await eventually(lambda: engine.status.activation_in_progress)
                stray.write_text("[Service]\nExecStart=/bin/true\n")
                await eventually(
                    lambda: running.has(FindingKind.UNMANAGED_UNIT, stray), what="judged"
                )
                assert engine.status.activation_stuck
                assert running.sample("provenanced_activation_stuck") == 1
                assert running.sample("provenanced_activation_in_progress") == 1
            finally:
                (gcroots / "new-home").unlink()
                stray.unlink(missing_ok=True)
            await eventually(lambda: not engine.status.activation_in_progress)
            assert not engine.status.activation_stuck

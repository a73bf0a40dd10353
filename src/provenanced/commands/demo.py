"""``provenanced demo``: the daemon on a throw-away user manager, with drift injected live.

Everything runs in a sandbox (``provenanced.sandbox``): a private ``systemd --user`` over a fake
Home Manager generation, never the caller's own manager. Ctrl-C or SIGTERM stops the daemon, the
sandbox and the journald we started, in that order, and leaves nothing running.

Over 400 lines on purpose: the scenario is one script, its steps read top to bottom as the demo
prints them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from systemd import journal

from provenanced.config import Settings
from provenanced.daemon.service import Daemon
from provenanced.logging import configure_logging
from provenanced.model import Finding, FindingKind
from provenanced.sandbox import (
    Generation,
    Journald,
    Sandbox,
    SandboxError,
    build_generation,
    ensure_journald,
    example_switch,
    read_journal,
    run_switch,
)
from provenanced.sandbox.quadlet import container_source
from provenanced.sinks.journal import DRIFT_DETECTED, JOB_UNVERIFIED, RELOAD_DONE

STEP_PAUSE = 8.0  # seconds between a change and the next one: time to look at the endpoints
DETECT_TIMEOUT = 20.0
_POLL = 0.05
_UNITS = ".config/systemd/user"
WEB = "podman-web.service"
REPORT = "nightly-report.service"
PROXY = "proxy.service"  # made by the quadlet stand-in from a Home Manager-linked source
_PROXY_SOURCE = ".config/containers/systemd/proxy.container"
_REPORT_INPUT = ".cache/nightly-report/input"
REMOVED = "old-sync.service"  # the units example_switch's second generation drops and adds
ADDED = "new-sync.service"
_REPORT_UNIT = """\
[Unit]
Description=Nightly report (runs only when its input exists)
ConditionPathExists=%h/.cache/nightly-report/input

[Service]
Type=oneshot
ExecStart=/bin/true
"""


_REPORT_TIMER = """\
[Unit]
Description=Run the nightly report

[Timer]
OnCalendar=daily

[Install]
WantedBy=timers.target
"""


def _demo_extras() -> dict[str, str]:
    """A quadlet source, and a timer-run oneshot whose Condition the scenario fails.

    The timer also keeps the oneshot loaded between runs: an unreferenced inactive unit is
    garbage-collected at once, and a re-loaded one reports ConditionResult=no by default.
    """
    timer = REPORT.replace(".service", ".timer")
    return {
        _PROXY_SOURCE: container_source("docker.io/library/nginx:1.25"),
        f"{_UNITS}/{REPORT}": _REPORT_UNIT,
        f"{_UNITS}/{timer}": _REPORT_TIMER,
        f"{_UNITS}/timers.target.wants/{timer}": _REPORT_TIMER,
    }


def demo_units() -> dict[str, str]:
    """The sandbox's example tree as example_switch's first generation has it, plus the extras."""
    before, _ = example_switch()
    return {**before, **_demo_extras()}


def switched_units() -> dict[str, str]:
    """What the scenario's Home Manager switch goes to: example_switch's second generation."""
    _, after = example_switch()
    return {**after, **_demo_extras()}


def _say(text: str = "") -> None:
    print(text, flush=True)


def demo_settings(sandbox: Sandbox, listen: str) -> Settings:
    """The user's environment may tune logging, never point the demo at a real manager or dir."""
    base = Settings.model_validate({"policy": {"quiet_window": 1.0, "alert_min_interval": 5.0}})
    return base.model_copy(
        update={
            "state_dir": sandbox.state_dir,
            "manager": base.manager.model_copy(update={"bus_address": None}),
            "metrics": base.metrics.model_copy(update={"listen": listen}),
        }
    )


@dataclass(frozen=True, slots=True)
class Step:
    """One drift of the scenario: how to cause it, what to watch, how to undo it."""

    title: str
    watch: str
    kind: FindingKind
    unit: str
    inject: Callable[[], Awaitable[None]]
    repair: Callable[[], Awaitable[None]] | None = None
    resolves: FindingKind | None = None  # what the repair closes, when not ``kind``


class Scenario:
    """Injects five field failures one after another into the sandbox, repairs them, then switches.

    Files change the way a person's ``cp`` or Home Manager's activation changes them: written
    beside the tree and renamed into place, so no half-written file is ever seen.
    """

    def __init__(self, sandbox: Sandbox, generation: Generation, daemon: Daemon) -> None:
        self.sandbox = sandbox
        self.generation = generation
        self.daemon = daemon
        self.web = sandbox.config_dir / WEB
        self.dropin = sandbox.admin_dir / f"{WEB}.d" / "50-forgotten.conf"
        self.report_input = sandbox.home / _REPORT_INPUT
        self.proxy_source = sandbox.home / _PROXY_SOURCE
        self.scratch = sandbox.root / "scratch"

    def steps(self) -> list[Step]:
        """The scenario, in order; the repairs leave the tree as Home Manager made it."""
        return [
            Step(
                "replace the Home Manager link of podman-web.service by a copy of its target",
                "a link-replaced finding (latent: same content) and a drift-detected journal entry",
                FindingKind.LINK_REPLACED,
                WEB,
                self._replace_link,
            ),
            Step(
                "edit that copy: podman-web.service on disk now differs from what is loaded",
                "stale-load, then the daemon reloads the manager (a reload-done journal entry) and "
                "stale-load resolves; link-replaced turns divergent",
                FindingKind.STALE_LOAD,
                WEB,
                self._edit_fragment,
                self._restore_link,
                resolves=FindingKind.LINK_REPLACED,
            ),
            Step(
                f"drop a forgotten override into the admin directory {self.dropin.parent}",
                "unmanaged-dropin: an admin-tier file that nothing vouches for",
                FindingKind.UNMANAGED_DROPIN,
                WEB,
                self._add_dropin,
                self._remove_dropin,
            ),
            Step(
                f"remove {REPORT}'s input and `systemctl --user restart` it",
                "systemctl exits 0, yet job-unverified opens: ConditionPathExists failed and "
                "nothing ran",
                FindingKind.JOB_UNVERIFIED,
                REPORT,
                self._unverified_restart,
                self._verified_restart,
            ),
            Step(
                f"replace the Home Manager link of the quadlet source {self.proxy_source.name} by "
                "an edited copy (a new image tag, PublishPort=0.0.0.0:80:80)",
                f"link-replaced on the source of {PROXY}; the daemon reloads, the generator "
                "re-runs on the edit, and the finding stays open until the link is back",
                FindingKind.LINK_REPLACED,
                PROXY,
                self._edit_proxy_source,
                self._restore_proxy_source,
            ),
        ]

    async def run(self) -> None:
        """Play every step: inject, wait for the finding, pause, repair, wait for it to close;
        then a clean Home Manager switch, through which the daemon must stay silent."""
        await self.daemon.engine.ready.wait()
        self.scratch.mkdir(exist_ok=True)
        await asyncio.sleep(STEP_PAUSE / 2)
        steps = self.steps()
        total = len(steps) + 1  # the switch comes last, on the tree every repair restored
        missed: list[str] = []
        for number, step in enumerate(steps, 1):
            _say(f"\n[step {number}/{total}] {step.title}")
            _say(f"           watch for: {step.watch}")
            started = time.monotonic()
            await step.inject()
            if not await self._wait_for(step.kind, step.unit, started, opened=True):
                missed.append(f"step {number} not seen")
            await asyncio.sleep(STEP_PAUSE)
            if step.repair is not None:
                _say(f"[step {number}/{total}] repairing")
                kind = step.resolves or step.kind
                # A finding that never opened cannot resolve: waiting for its absence proves nothing.
                was_open = self._open(kind, step.unit) is not None
                started = time.monotonic()
                await step.repair()
                if not was_open:
                    _say(f"           (no {kind.value} was open to resolve)")
                    missed.append(f"step {number} not resolved")
                elif not await self._wait_for(kind, step.unit, started, opened=False):
                    missed.append(f"step {number} not resolved")
                await asyncio.sleep(STEP_PAUSE / 2)
        _say(
            f"\n[step {total}/{total}] switch Home Manager to its next generation (25.11, "
            f"`home-manager switch`): {WEB} changes, backup.service stays, {REMOVED} goes, "
            f"{ADDED} comes"
        )
        _say(
            "           watch for: nothing while the activation runs (the daemon holds its "
            f"findings), then {REMOVED} gone and {ADDED} loaded"
        )
        if not await self._switch():
            missed.append(f"step {total} not silent")
        if missed:
            _say(f"\nScenario incomplete: {', '.join(missed)}. Ctrl-C stops.")
        else:
            _say(
                "\nScenario done: every drift was seen and repaired, and the switch was silent. "
                "The daemon keeps watching; Ctrl-C stops."
            )

    async def _switch(self) -> bool:
        """Switch to example_switch's second generation; say whether the daemon kept quiet."""
        engine = self.daemon.engine
        if engine.status.findings:
            _say(f"           ({len(engine.status.findings)} findings open before the switch)")
            return False
        target = build_generation(self.sandbox.store, switched_units(), "switched")
        seen: set[tuple[str, str, str]] = set()
        stop = asyncio.Event()

        async def sample() -> None:
            """What /api/v1/findings would serve, every 10 ms, until the daemon follows."""
            while not stop.is_set():
                seen.update((f.kind.value, f.unit, f.path) for f in engine.status.findings)
                await asyncio.sleep(0.01)

        def follows() -> bool:
            generation = engine.state.generation.path
            return generation == str(target.path) and not engine.status.activation_in_progress

        reloads = self._reloads()
        since_usec = time.time_ns() // 1000
        started = time.monotonic()
        sampler = asyncio.create_task(sample(), name="demo.switch.sample")
        try:
            await asyncio.to_thread(run_switch, self.sandbox, target, "standalone")
            followed = await self._until(follows, started + DETECT_TIMEOUT)
        except SandboxError as exc:
            _say(f"           (the switch failed: {exc})")
            return False
        finally:
            stop.set()
            await sampler
        seconds = time.monotonic() - started
        if not followed:
            _say(
                f"           (the daemon did not follow {target.path.name} within "
                f"{DETECT_TIMEOUT:g} s)"
            )
            return False
        self.generation = target
        own = self._reloads() - reloads
        drift = await asyncio.to_thread(self._drift_entries, since_usec)
        removed, added = await asyncio.gather(
            *(asyncio.to_thread(self.sandbox.show, unit, "LoadState") for unit in (REMOVED, ADDED))
        )
        reload_text = "no reload of the daemon's own" if own == 0 else f"{own:g} reloads of its own"
        _say(
            f"           switch done in {seconds:.2f} s: {len(seen)} findings, {drift} drift "
            f"entries, {reload_text}; {REMOVED} {removed['LoadState']}, "
            f"{ADDED} {added['LoadState']}"
        )
        for kind, unit, path in sorted(seen):
            _say(f"           reported during the switch: {kind} {unit} {path}")
        loads = (removed["LoadState"], added["LoadState"])
        return (len(seen), drift, own, *loads) == (0, 0, 0, "not-found", "loaded")

    def _reloads(self) -> float:
        """daemon-reloads the daemon itself sent, whatever triggered them and however they ended."""
        return sum(
            sample.value
            for metric in self.daemon.telemetry.registry.collect()
            for sample in metric.samples
            if sample.name == "provenanced_reloads_total"
        )

    def _drift_entries(self, since_usec: int) -> int:
        """This process's drift-detected journal entries about the sandbox since then."""
        marker = uuid.uuid4().hex
        journal.send("provenanced demo: journal sync", PROVENANCED_DEMO=marker)
        deadline = time.monotonic() + DETECT_TIMEOUT
        while not read_journal(f"PROVENANCED_DEMO={marker}") and time.monotonic() < deadline:
            time.sleep(_POLL)  # journald files entries asynchronously: wait for ours to land
        entries = read_journal(f"MESSAGE_ID={DRIFT_DETECTED}", f"_PID={os.getpid()}")
        return sum(
            1
            for entry in entries
            if int(entry["__REALTIME_TIMESTAMP"]) >= since_usec
            and entry.get("PROVENANCED_PATH", "").startswith(str(self.sandbox.root))
        )

    @staticmethod
    async def _until(condition: Callable[[], bool], deadline: float) -> bool:
        while not condition():
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(_POLL)
        return True

    async def _wait_for(
        self, kind: FindingKind, unit: str, started: float, *, opened: bool
    ) -> bool:
        """Say when the daemon published the change (bounded wait), from its open findings."""
        deadline = started + DETECT_TIMEOUT
        while (self._open(kind, unit) is None) == opened:
            if time.monotonic() >= deadline:
                state = "opened" if opened else "closed"
                _say(f"           (no {kind.value} {state} within {DETECT_TIMEOUT:g} s)")
                return False
            await asyncio.sleep(_POLL)
        seconds = time.monotonic() - started
        finding = self._open(kind, unit)
        if finding is not None:
            _say(
                f"           seen after {seconds:.2f} s: {finding.kind.value} {finding.unit} "
                f"{finding.path} ({finding.detail})"
            )
        else:
            _say(f"           resolved after {seconds:.2f} s: {kind.value} {unit}")
        return True

    def _open(self, kind: FindingKind, unit: str) -> Finding | None:
        for finding in self.daemon.engine.status.findings:
            if finding.kind is kind and finding.unit == unit:
                return finding
        return None

    def _swap_in(
        self, path: Path, content: bytes | None = None, target: Path | None = None
    ) -> None:
        """Replace ``path`` (never following it) by a file or a symlink built in scratch."""
        staged = self.scratch / path.name
        staged.unlink(missing_ok=True)
        if target is not None:
            staged.symlink_to(target)
        else:
            staged.write_bytes(content or b"")
            staged.chmod(0o644)
        os.replace(staged, path)

    async def _replace_link(self) -> None:
        self._swap_in(self.web, content=self.web.read_bytes())  # read through the link

    async def _edit_fragment(self) -> None:
        text = self.web.read_text().replace("Restart=on-failure", "Restart=always")
        self._swap_in(self.web, content=text.encode())

    async def _restore_link(self) -> None:
        self._swap_in(self.web, target=self.generation.home_files / _UNITS / WEB)

    async def _edit_proxy_source(self) -> None:
        edited = container_source("docker.io/library/nginx:latest", publish="0.0.0.0:80:80")
        self._swap_in(self.proxy_source, content=edited.encode())

    async def _restore_proxy_source(self) -> None:
        self._swap_in(self.proxy_source, target=self.generation.home_files / _PROXY_SOURCE)

    async def _add_dropin(self) -> None:
        self.dropin.parent.mkdir(parents=True, exist_ok=True)
        self._swap_in(self.dropin, content=b"[Service]\nEnvironment=WEB_PORT=9999\n")

    async def _remove_dropin(self) -> None:
        self.dropin.unlink()
        self.dropin.parent.rmdir()

    async def _restart(self) -> None:
        result = await asyncio.to_thread(self.sandbox.systemctl, "restart", REPORT, check=False)
        _say(f"           systemctl --user restart {REPORT} exited {result.returncode}")

    async def _unverified_restart(self) -> None:
        self.report_input.unlink()
        await self._restart()

    async def _verified_restart(self) -> None:
        self.report_input.write_text("ready\n")
        await self._restart()


def write_env_file(sandbox: Sandbox) -> Path:
    """A file to source in another shell: systemctl, journalctl and provenanced use the sandbox."""
    env = dict(sandbox.env)
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    lines = [f"export {name}={shlex.quote(value)}" for name, value in sorted(env.items())]
    path = sandbox.root / "env"
    path.write_text("\n".join(lines) + "\n")
    return path


def banner(sandbox: Sandbox, env_file: Path, listen: str, scenario: bool) -> Iterator[str]:
    """Where to look while the demo runs."""
    host, _, port = listen.rpartition(":")
    url = f"http://{host}:{port}"
    yield f"provenanced demo: a throw-away systemd --user in {sandbox.root}"
    yield f"  Home Manager tree   {sandbox.config_dir}"
    yield f"  metrics             {url}/metrics"
    yield f"  findings            {url}/api/v1/findings"
    yield f"  drift in journald   journalctl -f MESSAGE_ID={DRIFT_DETECTED}"
    yield f"  reloads             journalctl MESSAGE_ID={RELOAD_DONE}"
    yield f"  unverified jobs     journalctl MESSAGE_ID={JOB_UNVERIFIED}"
    yield f"  in another shell    . {env_file}"
    yield (
        "                      then: systemctl --user status; provenanced audit; provenanced show "
        + WEB
    )
    if not scenario:
        web = sandbox.config_dir / WEB
        dropin = sandbox.admin_dir / f"{WEB}.d"
        yield "Try, in that shell:"
        yield f'  cp --remove-destination "$(readlink -f {web})" {web}     # link-replaced'
        yield f"  mkdir -p {dropin}                                       # unmanaged-dropin:"
        yield f"  printf '[Service]\\nNice=5\\n' > {dropin}/50-x.conf"
        yield "  then undo each change: the finding resolves and the journal says so."
    yield "Ctrl-C stops the daemon, the sandbox and everything it started."


async def _serve(
    sandbox: Sandbox, generation: Generation, settings: Settings, scenario: bool
) -> None:
    """Run the daemon (and the scenario) until SIGINT or SIGTERM."""
    daemon = Daemon(settings, env=sandbox.env)
    daemon.start_http()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(daemon.run(stop), name="demo.daemon")
            tg.create_task(_announce_ready(daemon), name="demo.ready")
            if scenario:
                play = tg.create_task(
                    Scenario(sandbox, generation, daemon).run(), name="demo.scenario"
                )
                tg.create_task(_cancel_when_set(stop, play), name="demo.stop")
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


async def _announce_ready(daemon: Daemon) -> None:
    """Tell the newcomer the first full audit is done and how it came out."""
    await daemon.engine.ready.wait()
    status = daemon.engine.status
    _say(
        f"daemon ready: {status.units_audited} units audited, {len(status.findings)} open findings"
    )


async def _cancel_when_set(stop: asyncio.Event, task: asyncio.Task[None]) -> None:
    """End the scenario as soon as we are asked to stop, wherever it is."""
    await stop.wait()
    task.cancel()


@contextlib.contextmanager
def _uninterrupted() -> Iterator[None]:
    """A second Ctrl-C during teardown must not leave the sandbox half stopped."""
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM before the loop runs: unwind like Ctrl-C, so the teardown below still happens."""
    raise KeyboardInterrupt


def run_demo(scenario: bool, listen: str) -> int:
    """Boot the sandbox, serve the daemon on ``listen`` until interrupted, tear everything down."""
    previous = signal.signal(signal.SIGTERM, _interrupt)
    journald: Journald | None = None
    sandbox = Sandbox()
    try:
        journald = ensure_journald()
        generation = sandbox.install_home_manager(demo_units())
        report_input = sandbox.home / _REPORT_INPUT
        report_input.parent.mkdir(parents=True, exist_ok=True)
        report_input.write_text("ready\n")
        sandbox.install_quadlet()
        sandbox.start()
        settings = demo_settings(sandbox, listen)
        configure_logging(settings.log.level, settings.log.format)
        for line in banner(sandbox, write_env_file(sandbox), listen, scenario):
            _say(line)
        asyncio.run(_serve(sandbox, generation, settings, scenario))
    finally:
        with _uninterrupted():
            if sandbox.running:
                _say("provenanced demo: stopping the sandbox")
            try:
                sandbox.stop()
            finally:
                if journald is not None:
                    journald.stop()
        signal.signal(signal.SIGTERM, previous)
    return 0

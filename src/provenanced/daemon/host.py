"""Host mode: one daemon, as root, following every user manager on the machine.

Discovery says which managers run; each gets an ``Engine`` of its own (its connection to
``<runtime>/<uid>/systemd/private``, its watches, state, findings and actions) running in its
own task, with every file read and heal on a thread holding the user's filesystem rights
(``fs/fsuid.py``). One user's engine failing, hanging or being slow touches no other. All
engines share one metrics registry (every series labelled ``user``) and one HTTP endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import MappingProxyType

import structlog
from systemd import daemon as sd_daemon

from provenanced.config import Settings, load_settings
from provenanced.daemon import notify
from provenanced.daemon.discovery import Logind, RuntimeDirs, UserManager
from provenanced.daemon.engine import Engine
from provenanced.daemon.liveness import LoopProbe
from provenanced.daemon.reload import keeping, reload_on_request, signal_events
from provenanced.daemon.tasks import run_until
from provenanced.daemon.userpolicy import (
    UserPolicy,
    policy_path,
    read_policy_file,
    user_policy,
)
from provenanced.errors import ConfigError, ProvenancedError, StateError
from provenanced.fs.fsuid import Credentials, UserThread
from provenanced.model import DaemonStatus
from provenanced.sinks.http import HttpServer, start_http_server
from provenanced.sinks.journal import JournalSink
from provenanced.sinks.metrics import Telemetry

log = structlog.get_logger("provenanced.host")

# Seconds an engine gets to stop before its task is cancelled outright.
_STOP_GRACE = 5.0
# Pause before an engine that crashed is started again, so a broken manager is not hammered.
_RESTART_DELAY = 5.0
# What a reload cannot change in a running host daemon: sockets, logging and the places it
# looks in are set up at start. Until a restart the running daemon keeps the old values.
RESTART_KEYS = ("scope", "manager", "metrics", "log", "host.runtime_root", "host.state_root")


@dataclass
class _Followed:
    """One user's engine, the thread acting as them, and what ends them."""

    manager: UserManager
    engine: Engine
    thread: UserThread
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    reread: asyncio.Event = field(default_factory=asyncio.Event)  # a reload asks for the policy
    policy_task: asyncio.Task[None] | None = None


def user_state_dir(state_root: str, name: str) -> str:
    """``<state_root>/<name>``, created root-owned and mode 0700: no user reads another's state."""
    for path, mode in ((state_root, 0o755), (os.path.join(state_root, name), 0o700)):
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, mode)
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0:
            raise StateError(f"{path} is not a root-owned directory")
        if stat.S_IMODE(st.st_mode) & 0o022 or (mode == 0o700 and stat.S_IMODE(st.st_mode) & 0o077):
            os.chmod(path, mode)
    return os.path.join(state_root, name)


def user_settings(
    settings: Settings, manager: UserManager, policy: UserPolicy | None = None
) -> Settings:
    """The settings one user's engine runs with: their manager's private socket, no shared state,
    and their own policy when they have one."""
    bus = settings.manager.model_copy(update={"bus_address": manager.bus_address})
    update: dict[str, object] = {"manager": bus, "state_dir": None}
    if policy is not None:
        update["policy"] = policy.policy
    return settings.model_copy(update=update)


class HostDaemon:
    """Every user manager discovery reports, one engine each; build with settings, ``await run``."""

    def __init__(
        self,
        settings: Settings,
        logind: Logind | None = None,
        load: Callable[[], Settings] | None = None,
    ) -> None:
        """``load`` reads the configuration again on a reload (default: the system config)."""
        self.settings = settings
        self.logind = logind or Logind()
        self._load = load or partial(load_settings, None, host=True)
        self.telemetry = Telemetry(self.statuses, host=True)
        self.http: HttpServer | None = None
        self.discovered = asyncio.Event()  # the first scan of the runtime dirs is done
        self._followed: dict[int, _Followed] = {}
        # Swapped whole on each change: the HTTP thread reads it without a lock.
        self._engines: Mapping[str, Engine] = MappingProxyType({})
        self._wanted: Mapping[int, UserManager] = {}
        self._found: Mapping[int, UserManager] | None = None  # discovery's latest report
        self._changed = asyncio.Event()
        self._tg: asyncio.TaskGroup | None = None

    def statuses(self) -> Mapping[str, DaemonStatus]:
        """Each followed user's latest status, by user name (called on the HTTP thread)."""
        return {name: engine.status for name, engine in self._engines.items()}

    def engine(self, name: str) -> Engine | None:
        """The engine following ``name``'s manager, if any."""
        return self._engines.get(name)

    def start_http(self) -> HttpServer:
        """Serve metrics on the socket systemd passed us or on metrics.listen."""
        fds = sd_daemon.listen_fds()
        self.http = start_http_server(
            self.settings.metrics.listen,
            self.telemetry.registry,
            self.statuses,
            fd=fds[0] if fds else None,
            stalled_for=LoopProbe(asyncio.get_running_loop()).stalled_for,
            version=lambda: self.telemetry.version,
        )
        return self.http

    async def run(self, stop: asyncio.Event, reload_config: asyncio.Event | None = None) -> None:
        """Follow managers as they come and go until ``stop`` is set; ``reload_config`` (SIGHUP)
        re-reads the configuration."""
        if self.http is None:
            self.start_http()
        discovery = RuntimeDirs(self.settings.host.runtime_root, self._on_managers)
        requested = reload_config or asyncio.Event()
        try:
            await run_until(stop, lambda tg: self._start_loops(tg, discovery, requested))
        finally:
            notify.stopping()
            for uid in list(self._followed):
                await self._drop(uid, "daemon stopping")
            await self.logind.close()
            assert self.http is not None
            self.http.stop()

    def _start_loops(
        self, tg: asyncio.TaskGroup, discovery: RuntimeDirs, reload_config: asyncio.Event
    ) -> None:
        self._tg = tg
        tg.create_task(discovery.follow(), name="host.discover")
        tg.create_task(self.follow_users(), name="host.follow")
        reloads = reload_on_request(
            reload_config, self._load, lambda: self.settings, self.follow_settings, RESTART_KEYS
        )
        tg.create_task(reloads, name="config.reload")

    def follow_settings(self, settings: Settings) -> None:
        """Take a reloaded configuration: every engine re-reads its user's policy over the new
        host-wide one, and the allow and deny lists pick the users followed."""
        self.settings = keeping(settings, self.settings, RESTART_KEYS)
        for followed in self._followed.values():
            followed.reread.set()
        if self._found is not None:
            self._on_managers(self._found)

    def _on_managers(self, found: Mapping[int, UserManager]) -> None:
        host = self.settings.host
        self._found = found
        self._wanted = {uid: m for uid, m in found.items() if host.follows(m.name)}
        self._changed.set()

    async def follow_users(self) -> None:
        """Start an engine for each manager that appeared, drop the engine of each that left."""
        while True:
            await self._changed.wait()
            self._changed.clear()
            listed = await self.logind.users()
            wanted = {uid: m for uid, m in self._wanted.items() if listed is None or uid in listed}
            gone: dict[int, str] = {}
            for uid, followed in self._followed.items():
                if not self.settings.host.follows(followed.manager.name):
                    gone[uid] = "not allowed by host.allow_users/deny_users"
                elif wanted.get(uid) != followed.manager:
                    gone[uid] = "manager gone"
            # Our own descriptors, before any wait: discovery closes its own at its next scan.
            starting = [
                m.dup() for uid, m in wanted.items() if uid not in self._followed or uid in gone
            ]
            try:
                for uid, reason in gone.items():
                    await self._drop(uid, reason)
                while starting:
                    await self._start(starting.pop(0))
            finally:
                for manager in starting:  # stopped before their turn
                    manager.close()
            if not self.discovered.is_set():
                self.discovered.set()
                notify.ready(f"following {len(self._followed)} user managers")

    async def _start(self, manager: UserManager) -> None:
        """Follow ``manager``, whose descriptor is now the follower's (closed when it is dropped)."""
        bound = log.bind(user=manager.name, uid=manager.uid)
        try:
            thread = await UserThread.start(Credentials.of_uid(manager.uid))
        except (ProvenancedError, OSError, KeyError) as exc:
            manager.close()
            bound.error("host.user_failed", error=str(exc))
            return
        try:
            state_dir = user_state_dir(self.settings.host.state_root, manager.name)
        except (ProvenancedError, OSError) as exc:
            thread.close()
            manager.close()
            bound.error("host.user_failed", error=str(exc))
            return
        telemetry = self.telemetry.for_user(manager.name)
        engine = Engine(
            user_settings(self.settings, manager),
            telemetry,
            JournalSink(telemetry.record_alert, user=(manager.name, manager.uid)),
            manager.env(),
            executor=thread.executor(),
            state_dir=state_dir,
            uid=manager.uid,
        )
        followed = _Followed(manager, engine, thread)
        assert self._tg is not None
        followed.task = self._tg.create_task(
            self._supervise(followed), name=f"host.user.{manager.uid}"
        )
        followed.policy_task = self._tg.create_task(
            self._reread_policy(followed), name=f"host.policy.{manager.uid}"
        )
        self._followed[manager.uid] = followed
        self._publish()
        bound.info("host.user_followed", socket=manager.socket_path, address=manager.bus_address)

    async def _supervise(self, followed: _Followed) -> None:
        """Run one user's engine; a crash is logged and the engine started afresh, alone."""
        bound = log.bind(user=followed.manager.name, uid=followed.manager.uid)
        # Before the engine runs, so it never acts by the host's policy where the user set theirs.
        settings = await self._user_settings(followed)
        if settings != followed.engine.settings:
            followed.engine.follow_settings(settings)
        while not followed.stop.is_set():
            try:
                await followed.engine.run(followed.stop)
            except (
                Exception
            ) as exc:  # one user's failure (an ExceptionGroup too) must not end the host
                bound.error("host.engine_crashed", error=str(exc), restart_in=_RESTART_DELAY)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_RESTART_DELAY):
                        await followed.stop.wait()

    async def _reread_policy(self, followed: _Followed) -> None:
        """At each reload: the user's policy over the new host-wide one, and a full look again."""
        while True:
            await followed.reread.wait()
            followed.reread.clear()
            followed.engine.follow_settings(await self._user_settings(followed))

    async def _user_settings(self, followed: _Followed) -> Settings:
        """The host's settings with the user's policy file applied, read as the user.

        A file that cannot be read or is invalid is one error line; the host's policy applies.
        """
        manager = followed.manager
        path = policy_path(manager.home)
        bound = log.bind(user=manager.name, uid=manager.uid, path=path)
        host = self.settings
        try:
            data = await followed.thread.run(read_policy_file, path)
            policy = user_policy(data, host.policy, f"{manager.name}: {path}")
        except ProvenancedError as exc:
            bound.error("policy.user_file_refused", error=str(exc), using="host policy")
            return user_settings(host, manager)
        if policy.clamped:
            # A value beyond what a user may set; the host's value stays for that key.
            bound.warning("policy.user_file_clamped", keys=list(policy.clamped))
        source = path if data is not None else "host"
        bound.info("policy.effective", source=source, overrides=list(policy.overridden))
        return user_settings(host, manager, policy)

    async def _drop(self, uid: int, reason: str) -> None:
        followed = self._followed.pop(uid)
        self._publish()  # its findings go now, not when its engine has stopped
        followed.engine.telemetry.retire()  # and its counters: no series outlives its user
        followed.stop.set()
        if followed.policy_task is not None:
            followed.policy_task.cancel()
        try:
            if followed.task is not None:
                # asyncio.wait neither raises the task's end nor cancels it at the deadline.
                _done, pending = await asyncio.wait([followed.task], timeout=_STOP_GRACE)
                for task in pending:
                    task.cancel()
        finally:
            # Also when the daemon stops during the wait: the thread must not outlive the user.
            followed.thread.close()
            followed.manager.close()  # the engine is done with the socket's address
            log.info("host.user_dropped", user=followed.manager.name, uid=uid, reason=reason)

    def _publish(self) -> None:
        self._engines = MappingProxyType(
            {f.manager.name: f.engine for f in self._followed.values()}
        )


async def serve_host(
    settings: Settings, config_path: Path | None, load: Callable[[], Settings] | None = None
) -> None:
    """The ``provenanced run --host`` entry: signals set events, the daemon does the rest.

    ``load`` re-reads the configuration on SIGHUP the way it was read at start.
    """
    if os.geteuid() != 0:
        raise ConfigError("host mode reads every user's manager and must run as root")
    daemon = HostDaemon(settings, load=load)
    daemon.start_http()
    stop, hup = signal_events()
    log.info(
        "daemon.starting",
        pid=os.getpid(),
        listen=settings.metrics.listen,
        scope="host",
        runtime_root=settings.host.runtime_root,
        config=str(config_path) if config_path else None,
    )
    await daemon.run(stop, hup)
    log.info("daemon.stopped")

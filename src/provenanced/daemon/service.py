"""The process around the engine: telemetry, journald, HTTP, sd_notify, signals, config reload."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path

import structlog
from systemd import daemon as sd_daemon

from provenanced.config import Settings, load_settings
from provenanced.daemon import notify
from provenanced.daemon.engine import Engine
from provenanced.daemon.liveness import LoopProbe
from provenanced.daemon.reload import reload_on_request, signal_events
from provenanced.daemon.tasks import run_until
from provenanced.fs.iothread import IoThread
from provenanced.model import DaemonStatus
from provenanced.sinks.http import HttpServer, TlsFiles, start_http_server
from provenanced.sinks.journal import JournalSink
from provenanced.sinks.metrics import Telemetry

log = structlog.get_logger("provenanced.daemon")

# Sections whose change needs a restart: they shape connections and sockets made at start.
_RESTART_SECTIONS = ("state_dir", "manager", "metrics", "log")


def _tls(settings: Settings) -> TlsFiles | None:
    tls = settings.metrics.tls
    if tls.cert_file is None or tls.key_file is None:
        return None
    return TlsFiles(
        str(tls.cert_file),
        str(tls.key_file),
        str(tls.client_ca_file) if tls.client_ca_file else None,
    )


class Daemon:
    """One running provenanced: build with settings, ``await run(stop)``."""

    def __init__(
        self, settings: Settings, config_path: Path | None = None, env: dict[str, str] | None = None
    ) -> None:
        self.env = dict(os.environ if env is None else env)
        self._status: Callable[[], DaemonStatus] = DaemonStatus
        self.telemetry = Telemetry(lambda: self._status())
        self.journal = JournalSink(on_result=self.telemetry.record_alert)
        # Every file read, watch and heal runs here: a read hung on a dead mount stalls the
        # engine, never the loop, and the thread is not joined when the daemon stops.
        self._io = IoThread("engine.io")
        self.engine = Engine(settings, self.telemetry, self.journal, self.env, executor=self._io)
        self._status = lambda: self.engine.status
        self._config_path = config_path
        self.http: HttpServer | None = None

    def start_http(self) -> HttpServer:
        """Serve metrics on the socket systemd passed us (socket activation) or on metrics.listen.

        Call it on the loop the daemon runs on: /-/healthy probes that loop.
        """
        fds = sd_daemon.listen_fds()
        settings = self.engine.settings
        self.http = start_http_server(
            settings.metrics.listen,
            self.telemetry.registry,
            self._status,
            tls=_tls(settings),
            fd=fds[0] if fds else None,
            stalled_for=LoopProbe(asyncio.get_running_loop()).stalled_for,
            version=lambda: self.telemetry.version,
        )
        return self.http

    async def run(self, stop: asyncio.Event, reload_config: asyncio.Event | None = None) -> None:
        """Serve until ``stop`` is set; SIGHUP (``reload_config``) re-reads the configuration."""
        if self.http is None:
            self.start_http()
        try:
            await run_until(stop, lambda tg: self._start_loops(tg, stop, reload_config))
        finally:
            notify.stopping()
            self._io.shutdown(wait=False, cancel_futures=True)
            assert self.http is not None
            self.http.stop()

    def _start_loops(
        self, tg: asyncio.TaskGroup, stop: asyncio.Event, reload_config: asyncio.Event | None
    ) -> None:
        tg.create_task(self.engine.run(stop), name="engine")
        tg.create_task(self._announce_ready(), name="notify.ready")
        requested = reload_config or asyncio.Event()
        tg.create_task(self.reload_config_on_signal(requested), name="config.reload")
        interval = notify.watchdog_interval(self.env)
        if interval:
            tg.create_task(notify.keep_watchdog_fed(interval), name="notify.watchdog")

    async def _announce_ready(self) -> None:
        await self.engine.ready.wait()
        notify.ready(f"watching {self.engine.status.units_audited} units")

    async def reload_config_on_signal(self, requested: asyncio.Event) -> None:
        """SIGHUP: re-read the configuration; a broken one is logged and the old one stays."""
        await reload_on_request(
            requested,
            partial(load_settings, self._config_path),
            lambda: self.engine.settings,
            self.engine.follow_settings,
            _RESTART_SECTIONS,
        )


async def serve(settings: Settings, config_path: Path | None) -> None:
    """The ``provenanced run`` entry: signals set events, the daemon does the rest."""
    daemon = Daemon(settings, config_path)
    daemon.start_http()
    stop, hup = signal_events()
    log.info("daemon.starting", pid=os.getpid(), listen=settings.metrics.listen)
    await daemon.run(stop, hup)
    log.info("daemon.stopped")

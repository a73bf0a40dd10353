"""Wire the daemon together: engine, telemetry, journald, HTTP, signals, socket activation."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable
from pathlib import Path

import structlog
from systemd import daemon as sd_daemon

from provenanced.config import Settings, load_settings
from provenanced.engine import Engine
from provenanced.liveness import LoopProbe
from provenanced.model import DaemonStatus
from provenanced.sinks.http import HttpServer, TlsFiles, start_http_server
from provenanced.sinks.journal import JournalSink
from provenanced.sinks.metrics import Telemetry

log = structlog.get_logger("provenanced.daemon")


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
        self.engine = Engine(
            settings,
            self.telemetry,
            self.journal,
            self.env,
            load_settings=lambda: load_settings(config_path),
        )
        self._status = lambda: self.engine.status
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
        )
        return self.http

    async def run(self, stop: asyncio.Event, reload_config: asyncio.Event | None = None) -> None:
        """Serve until ``stop`` is set."""
        if self.http is None:
            self.start_http()
        try:
            await self.engine.run(stop, reload_config)
        finally:
            assert self.http is not None
            self.http.stop()


async def serve(settings: Settings, config_path: Path | None) -> None:
    """The ``provenanced run`` entry: signals set events, the engine does the rest."""
    daemon = Daemon(settings, config_path)
    daemon.start_http()
    stop, hup = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, hup.set)
    log.info("daemon.starting", pid=os.getpid(), listen=settings.metrics.listen)
    await daemon.run(stop, hup)
    log.info("daemon.stopped")

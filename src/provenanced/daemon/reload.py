"""Signals: stop on SIGTERM or SIGINT, re-read the configuration on SIGHUP (user and host mode)."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Sequence
from typing import Any

import structlog

from provenanced.config import Settings
from provenanced.daemon import notify

log = structlog.get_logger("provenanced.daemon")


def signal_events() -> tuple[asyncio.Event, asyncio.Event]:
    """Events the running loop sets on SIGTERM or SIGINT (stop) and on SIGHUP (reload)."""
    stop, hup = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, hup.set)
    return stop, hup


def value_of(settings: Settings, key: str) -> Any:
    """The value of a dotted key (``host.runtime_root``)."""
    value: Any = settings
    for part in key.split("."):
        value = getattr(value, part)
    return value


def changed(old: Settings, new: Settings, keys: Sequence[str]) -> list[str]:
    """The dotted ``keys`` whose value differs between ``old`` and ``new``."""
    return [key for key in keys if value_of(old, key) != value_of(new, key)]


def keeping(new: Settings, old: Settings, keys: Sequence[str]) -> Settings:
    """``new`` with ``old``'s value for each dotted key in ``keys``."""
    for key in keys:
        new = _replaced(new, key.split("."), value_of(old, key))
    return new


def _replaced(model: Any, path: list[str], value: Any) -> Any:
    head, *rest = path
    inner = _replaced(getattr(model, head), rest, value) if rest else value
    return model.model_copy(update={head: inner})


async def reload_on_request(
    requested: asyncio.Event,
    load: Callable[[], Settings],
    current: Callable[[], Settings],
    apply: Callable[[Settings], None],
    restart_keys: Sequence[str],
) -> None:
    """Each time ``requested`` is set: load, ``apply`` what loaded; a broken file changes nothing.

    A changed key of ``restart_keys`` is logged as waiting for a restart (``apply`` decides
    whether the running daemon keeps its old value).
    """
    while True:
        await requested.wait()
        requested.clear()
        notify.reloading()
        try:
            # In a thread: a slow file system must not stall the loop (or the watchdog).
            settings = await asyncio.to_thread(load)
        except Exception as exc:  # any failure to load keeps the running configuration
            log.error("config.reload_failed", error=str(exc))
        else:
            pending = changed(current(), settings, restart_keys)
            apply(settings)
            if pending:
                log.warning("config.restart_needed", sections=pending)
            log.info("config.reloaded")
        notify.notify("READY=1", "STATUS=configuration reloaded")

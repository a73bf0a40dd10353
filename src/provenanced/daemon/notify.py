"""sd_notify: readiness, status, reloading, stopping and the watchdog heartbeat."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Mapping

from systemd import daemon


def notify(*fields: str) -> bool:
    """Send one notification; a no-op (False) when not started by systemd with NOTIFY_SOCKET."""
    if not os.environ.get("NOTIFY_SOCKET"):
        return False
    try:
        return bool(daemon.notify("\n".join(fields)))
    except OSError:
        # The socket is gone (the manager went away): there is no one to tell; carry on.
        return False


def ready(status: str) -> None:
    """Tell systemd start-up is complete (Type=notify)."""
    notify("READY=1", f"STATUS={status}")


def status(text: str) -> None:
    """Update the one-line status ``systemctl status`` shows."""
    notify(f"STATUS={text}")


def reloading() -> None:
    """Announce a configuration reload (ExecReload/SIGHUP), with the timestamp systemd 253+ wants."""
    notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")


def stopping() -> None:
    """Announce shutdown so systemd does not count it as a crash."""
    notify("STOPPING=1")


def watchdog_interval(env: Mapping[str, str] = os.environ) -> float | None:
    """Half the watchdog timeout systemd armed for this process, or None when it is off."""
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2_000_000


async def keep_watchdog_fed(interval: float) -> None:
    """Ping the watchdog from the event loop, so a stuck loop (not just a dead process) trips it."""
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval)

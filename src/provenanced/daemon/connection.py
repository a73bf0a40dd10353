"""Follow one user manager's connection: connect, hand it over, wait for the drop, back off."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Mapping

import structlog

from provenanced.config import ManagerSettings
from provenanced.errors import ManagerCallError, ManagerUnreachableError
from provenanced.systemd.bus import CallHook, ManagerConnection, resolve_address

log = structlog.get_logger("provenanced.engine")


async def follow_manager(
    settings: Callable[[], ManagerSettings],
    env: Mapping[str, str],
    on_call: CallHook,
    connected: Callable[[ManagerConnection], Awaitable[None]],
    lost: Callable[[str], Awaitable[None]],
) -> None:
    """Connect, let ``connected`` subscribe and resync, wait for the drop; back off and repeat."""
    delay = 0.5
    while True:
        manager = settings()
        address = manager.bus_address or "(auto)"
        try:
            transport = resolve_address(manager.bus_address, env)
            address = transport.address
            conn = await ManagerConnection.connect(
                transport,
                timeout=manager.call_timeout,
                max_in_flight=manager.max_in_flight,
                on_call=on_call,
            )
            await connected(conn)
            log.info("manager.connected", address=address, transport=transport.kind)
            delay = 0.5
            await conn.wait_for_disconnect()
            log.warning("manager.disconnected", address=address)
        except (ManagerUnreachableError, ManagerCallError) as exc:
            log.warning("manager.unreachable", address=address, error=str(exc))
        await lost(address)
        # Capped full jitter: many daemons restarting with one manager do not stampede it.
        await asyncio.sleep(random.uniform(0, delay))
        delay = min(delay * 2, manager.reconnect_max_delay)

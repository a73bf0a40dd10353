"""The manager's D-Bus connection: transport choice, bounded calls with timeouts, signals."""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import dbus_fast.aio
from dbus_fast import Message, MessageType
from dbus_fast.errors import AuthError, DBusFastError

from provenanced.errors import ManagerCallError, ManagerUnreachableError
from provenanced.systemd.events import (
    DBUS_NAME,
    DBUS_PATH,
    MANAGER_IFACE,
    MANAGER_PATH,
    PROPERTIES_IFACE,
    SYSTEMD_NAME,
)

__all__ = [
    "DBUS_NAME",
    "MANAGER_IFACE",
    "MANAGER_PATH",
    "PROPERTIES_IFACE",
    "SYSTEMD_NAME",
    "CallHook",
    "CallResult",
    "ManagerConnection",
    "SignalHandler",
    "Transport",
    "TransportKind",
    "resolve_address",
]

TransportKind = Literal["explicit", "private", "bus"]
CallResult = Literal["ok", "error", "timeout"]
CallHook = Callable[[str, CallResult], None]
SignalHandler = Callable[[Message], None]

DEFAULT_TIMEOUT = 10.0
# Deep enough that the manager always has a request queued while we decode a batch of replies
# (at 32 the two took turns: a full read at 1,000 units took about the sum of both CPUs), and
# a quarter of the ~256 at which dbus-fast's unbuffered send fails with EAGAIN.
DEFAULT_MAX_IN_FLIGHT = 64
_MAX_AUTH_REPLY = 512  # bytes; a SASL reply line is "OK " and a 32-digit GUID, or an error word
# One rule for every manager signal; per-unit rules (what proxies add) would cost one each.
_MANAGER_MATCH = f"type='signal',sender='{SYSTEMD_NAME}',path_namespace='{MANAGER_PATH}'"
_OWNER_MATCH = (
    f"type='signal',sender='{DBUS_NAME}',path='{DBUS_PATH}',interface='{DBUS_NAME}',"
    f"member='NameOwnerChanged',arg0='{SYSTEMD_NAME}'"
)
# Bytes left unescaped in an address value: the D-Bus spec also allows "\\" and "*", but
# dbus-fast's parser rejects them, and escaping is always allowed.
_ADDRESS_SAFE = frozenset(b"-0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_/.")


@dataclass(frozen=True, slots=True)
class Transport:
    """Where the manager is reached, and how that address was chosen."""

    address: str
    kind: TransportKind


def _unix_address(path: str) -> str:
    """A ``unix:path=`` address with the path escaped as the D-Bus spec requires."""
    raw = os.fsencode(path)
    return "unix:path=" + "".join(chr(b) if b in _ADDRESS_SAFE else f"%{b:02x}" for b in raw)


def _is_socket(path: str) -> bool:
    """Whether ``path`` is a socket right now; a stale regular file or nothing is not."""
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


def resolve_address(explicit: str | None, env: Mapping[str, str]) -> Transport:
    """Pick the transport as ``systemctl --user`` does: the private socket first, then the bus."""
    if explicit:
        return Transport(explicit, "explicit")
    runtime = env.get("XDG_RUNTIME_DIR", "")
    tried: list[str] = []
    # sd-bus ignores a relative runtime dir too; it would name a different socket per cwd.
    if not os.path.isabs(runtime):
        tried.append(f"XDG_RUNTIME_DIR ({'relative' if runtime else 'unset'})")
        runtime = ""
    if runtime:
        private = os.path.join(runtime, "systemd/private")
        if _is_socket(private):
            return Transport(_unix_address(private), "private")
        tried.append(f"{private} (no socket)")
    session = env.get("DBUS_SESSION_BUS_ADDRESS", "")
    if session:
        return Transport(session, "bus")
    tried.append("DBUS_SESSION_BUS_ADDRESS (unset)")
    if runtime:
        bus = os.path.join(runtime, "bus")
        if _is_socket(bus):
            return Transport(_unix_address(bus), "bus")
        tried.append(f"{bus} (no socket)")
    raise ManagerUnreachableError(
        f"user manager unreachable: tried {', '.join(tried)}; "
        "set PROVENANCED_MANAGER__BUS_ADDRESS to name the manager's address"
    )


class _PipelinedAuthBus(dbus_fast.aio.MessageBus):
    """A MessageBus that sends SASL ``BEGIN`` together with ``AUTH``, as sd-bus clients do.

    systemd 252's private socket (an sd-bus server) leaves a message that reaches it in the same
    read as ``BEGIN`` unprocessed until more bytes arrive. dbus-fast sends ``BEGIN`` after the
    server's ``OK`` and its ``Hello`` right behind it, so connects hung at random (measured here:
    ``BEGIN``+message in one write, 0 of 40 answered; pipelined ``AUTH``+``BEGIN``, 300 of 300).
    With ``BEGIN`` pipelined, the first message can only follow the server's ``OK``. dbus-daemon
    accepts the same pipelining from sd-bus clients every day.

    With ``BEGIN`` sent, the server may write its first messages (systemd signals every private
    connection) right behind ``OK``. dbus-fast's line reader reads in chunks and would swallow
    them, or fail with "auth line exceeded maximum size"; this one reads the line byte by byte,
    so everything after it stays in the socket for the message reader.
    """

    async def _inner_authenticate(self) -> None:
        sock = self._sock
        if sock is None:
            raise AuthError("socket closed before authentication")
        uid = str(os.geteuid()).encode().hex()
        await self._loop.sock_sendall(sock, f"\0AUTH EXTERNAL {uid}\r\nBEGIN\r\n".encode())
        line = bytearray()
        while not line.endswith(b"\r\n"):
            byte = await self._loop.sock_recv(sock, 1)  # "OK <32 hex digits>": 37 reads, once
            if not byte:
                raise AuthError("connection closed during authentication")
            line += byte
            if len(line) > _MAX_AUTH_REPLY:
                raise AuthError("authentication reply too long")
        reply = line[:-2].decode("ascii", "replace")
        if not reply.startswith("OK "):
            raise AuthError(f"authentication failed: {reply!r}")


def _consume(task: asyncio.Future[None]) -> None:
    """Retrieve a finished task's outcome so asyncio does not log it as never retrieved."""
    if not task.cancelled():
        task.exception()


def _error_text(exc: BaseException) -> str:
    """One readable clause for a library or OS error."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__


class ManagerConnection:
    """One connection to the user manager; every call is bounded in time and in concurrency."""

    def __init__(
        self,
        bus: dbus_fast.aio.MessageBus,
        transport: Transport,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        on_call: CallHook | None = None,
    ) -> None:
        self.transport = transport
        self.timeout = timeout
        self.max_in_flight = max_in_flight
        self._bus = bus
        # dbus-fast drops the connection with EAGAIN at ~256 calls in flight (DESIGN.md §3).
        self._slots = asyncio.Semaphore(max_in_flight)
        self._on_call = on_call
        self._handlers: list[SignalHandler] = []
        self._subscribed = False
        self._disconnect: asyncio.Future[None] | None = None
        bus.add_message_handler(self._dispatch)

    @classmethod
    async def connect(
        cls,
        transport: Transport,
        timeout: float = DEFAULT_TIMEOUT,
        *,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        on_call: CallHook | None = None,
    ) -> ManagerConnection:
        """Connect and authenticate, or raise ManagerUnreachableError naming the address."""
        try:
            bus = _PipelinedAuthBus(bus_address=transport.address, auth_timeout=timeout)
            async with asyncio.timeout(timeout):
                await bus.connect()
        # Everything dbus-fast raises here means the same: nobody usable at this address.
        except (OSError, EOFError, TimeoutError, DBusFastError) as exc:
            raise ManagerUnreachableError(
                f"user manager unreachable at {transport.address} ({transport.kind}): "
                f"{_error_text(exc)}"
            ) from exc
        return cls(bus, transport, timeout=timeout, max_in_flight=max_in_flight, on_call=on_call)

    @property
    def connected(self) -> bool:
        """Whether the socket is still up."""
        return bool(self._bus.connected)

    @property
    def peer(self) -> bool:
        """Whether this is a peer-to-peer link to the manager (its private socket), not a bus.

        A broker answers ``Hello`` with a unique name (``:1.42``); the manager's private socket
        answers with an UnknownObject error, whose text dbus-fast 5 stores as the unique name.
        """
        return self.transport.kind == "private" or not (self._bus.unique_name or "").startswith(":")

    async def call(
        self,
        member: str,
        signature: str = "",
        body: Sequence[Any] = (),
        *,
        interface: str = MANAGER_IFACE,
        path: str = MANAGER_PATH,
        destination: str = SYSTEMD_NAME,
        timeout: float | None = None,
    ) -> list[Any]:
        """One method call returning the reply body; errors and timeouts raise ManagerCallError."""
        limit = self.timeout if timeout is None else timeout
        message = Message(
            destination=destination,
            path=path,
            interface=interface,
            member=member,
            signature=signature,
            body=list(body),
        )
        async with self._slots:
            if not self._bus.connected:
                self._report(member, "error")
                raise ManagerCallError(f"{member}: not connected to {self.transport.address}")
            try:
                async with asyncio.timeout(limit):
                    reply = await self._bus.call(message)
            except TimeoutError as exc:
                self._report(member, "timeout")
                raise ManagerCallError(f"{member} on {path}: no reply within {limit:g} s") from exc
            # dbus-fast hands whatever broke the socket to every pending call: all mean "failed".
            except Exception as exc:
                self._report(member, "error")
                raise ManagerCallError(
                    f"{member} on {path}: connection lost ({_error_text(exc)})"
                ) from exc
        if reply is None:
            self._report(member, "error")
            raise ManagerCallError(f"{member} on {path}: connection closed")
        if reply.message_type is MessageType.ERROR:
            self._report(member, "error")
            text = reply.body[0] if reply.body and isinstance(reply.body[0], str) else ""
            name = reply.error_name or "unknown error"
            raise ManagerCallError(f"{member} on {path} failed: {name}: {text}", name, text)
        self._report(member, "ok")
        return list(reply.body)

    def _report(self, member: str, result: CallResult) -> None:
        """Feed the metrics hook, when one was given."""
        if self._on_call is not None:
            self._on_call(member, result)

    async def subscribe(self, handler: SignalHandler) -> Callable[[], None]:
        """Deliver every signal to ``handler``; returns a function that stops the delivery.

        The first call turns signals on: on the bus one ``AddMatch`` for the manager's signals and
        one for its ``NameOwnerChanged``, then ``Subscribe()``; on the private socket signals come
        unasked, so only ``Subscribe()``.
        """
        self._handlers.append(handler)
        if not self._subscribed:
            if not self.peer:
                for rule in (_MANAGER_MATCH, _OWNER_MATCH):
                    await self.call(
                        "AddMatch",
                        "s",
                        [rule],
                        interface=DBUS_NAME,
                        path=DBUS_PATH,
                        destination=DBUS_NAME,
                    )
            await self.call("Subscribe")
            self._subscribed = True

        def unsubscribe() -> None:
            if handler in self._handlers:
                self._handlers.remove(handler)

        return unsubscribe

    def _dispatch(self, msg: Message) -> None:
        """Fan signals out to the handlers; replies and calls stay with dbus-fast."""
        if msg.message_type is MessageType.SIGNAL:
            for handler in tuple(self._handlers):
                handler(msg)

    def _disconnected(self) -> asyncio.Future[None]:
        """One shared task per connection that ends when dbus-fast reports the socket gone."""
        if self._disconnect is None:
            waiter = self._bus.wait_for_disconnect()  # type: ignore[no-untyped-call]  # unannotated upstream
            self._disconnect = asyncio.ensure_future(waiter)
            # Mark the outcome as seen: nobody may be waiting when the connection breaks.
            self._disconnect.add_done_callback(_consume)
        return self._disconnect

    async def wait_for_disconnect(self) -> BaseException | None:
        """Return once the connection is gone: the error that broke it, or None after close()."""
        # Awaiting dbus-fast's future directly lets a cancelled waiter (the engine shutting down)
        # cancel that future for good, and close() would then raise CancelledError.
        try:
            await asyncio.shield(self._disconnected())
        # Here the error is the answer, not a failure: the caller only wants to know why.
        except Exception as exc:
            return exc
        return None

    async def close(self) -> None:
        """Disconnect and wait (bounded) until dbus-fast has let go of the socket; idempotent."""
        self._bus.disconnect()
        async with asyncio.timeout(self.timeout):
            await self.wait_for_disconnect()

    async def __aenter__(self) -> ManagerConnection:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

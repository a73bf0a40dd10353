"""Transport choice and connection failures, without a manager."""

from __future__ import annotations

import asyncio
import inspect
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import dbus_fast.aio
import pytest
from dbus_fast import Message, MessageType
from dbus_fast._private.address import parse_address
from dbus_fast.aio.message_bus import HELLO_1_SERIALIZED as _HELLO

from provenanced.errors import ManagerUnreachableError
from provenanced.systemd.bus import ManagerConnection, Transport, resolve_address


@pytest.fixture
def runtime(tmp_path: Path) -> Path:
    """An empty XDG_RUNTIME_DIR."""
    path = tmp_path / "run"
    (path / "systemd").mkdir(parents=True)
    return path


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    """Unix sockets a test binds; closed afterwards."""
    opened: list[socket.socket] = []
    yield opened
    for sock in opened:
        sock.close()


def _bind(path: Path, opened: list[socket.socket], *, listen: bool = True) -> None:
    """A unix socket file at ``path``, listening unless told otherwise."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    if listen:
        sock.listen()
    opened.append(sock)


def _hello_reply() -> bytes:
    """A broker's answer to the first Hello: the unique name ``:1.1``."""
    reply = Message(
        message_type=MessageType.METHOD_RETURN, reply_serial=1, signature="s", body=[":1.1"]
    )
    reply.serial = 1
    return bytes(reply._marshall(False))


class TestResolveAddress:
    """The transport order of DESIGN §5: explicit, private socket, session bus, runtime bus."""

    def test_explicit_wins(self, runtime: Path, sockets: list[socket.socket]) -> None:
        """An explicit address is used even when the private socket exists."""
        _bind(runtime / "systemd/private", sockets)
        env = {"XDG_RUNTIME_DIR": str(runtime), "DBUS_SESSION_BUS_ADDRESS": "unix:path=/x"}
        assert resolve_address("unix:path=/y", env) == Transport("unix:path=/y", "explicit")

    def test_private_socket_first(self, runtime: Path, sockets: list[socket.socket]) -> None:
        """The manager's private socket beats the session bus address."""
        _bind(runtime / "systemd/private", sockets)
        _bind(runtime / "bus", sockets)
        env = {"XDG_RUNTIME_DIR": str(runtime), "DBUS_SESSION_BUS_ADDRESS": "unix:path=/x"}
        assert resolve_address(None, env) == Transport(
            f"unix:path={runtime}/systemd/private", "private"
        )

    def test_session_bus_next(self, runtime: Path, sockets: list[socket.socket]) -> None:
        """Without a private socket, DBUS_SESSION_BUS_ADDRESS is taken as is."""
        _bind(runtime / "bus", sockets)
        env = {"XDG_RUNTIME_DIR": str(runtime), "DBUS_SESSION_BUS_ADDRESS": "unix:path=/x"}
        assert resolve_address(None, env) == Transport("unix:path=/x", "bus")

    def test_runtime_bus_last(self, runtime: Path, sockets: list[socket.socket]) -> None:
        """Without both, the bus socket in the runtime dir is derived (dbus-fast would not)."""
        _bind(runtime / "bus", sockets)
        env = {"XDG_RUNTIME_DIR": str(runtime), "DBUS_SESSION_BUS_ADDRESS": ""}
        assert resolve_address(None, env) == Transport(f"unix:path={runtime}/bus", "bus")

    def test_regular_file_is_no_socket(self, runtime: Path) -> None:
        """A leftover regular file at a socket path is skipped, and the error says so."""
        (runtime / "systemd/private").write_text("")
        (runtime / "bus").write_text("")
        with pytest.raises(ManagerUnreachableError) as caught:
            resolve_address(None, {"XDG_RUNTIME_DIR": str(runtime)})
        message = str(caught.value)
        assert f"{runtime}/systemd/private (no socket)" in message
        assert f"{runtime}/bus (no socket)" in message
        assert "DBUS_SESSION_BUS_ADDRESS (unset)" in message

    @pytest.mark.parametrize("runtime_dir", ["", "relative/run"])
    def test_unusable_runtime_dir(self, runtime_dir: str) -> None:
        """An unset or relative XDG_RUNTIME_DIR leaves only the session bus address."""
        env = {"XDG_RUNTIME_DIR": runtime_dir, "DBUS_SESSION_BUS_ADDRESS": "unix:path=/x"}
        assert resolve_address(None, env).kind == "bus"
        with pytest.raises(ManagerUnreachableError, match="XDG_RUNTIME_DIR"):
            resolve_address(None, {"XDG_RUNTIME_DIR": runtime_dir})

    def test_nothing_at_all(self) -> None:
        """An empty environment is a clear error with the manager-unreachable exit code."""
        with pytest.raises(ManagerUnreachableError, match="PROVENANCED_MANAGER__BUS_ADDRESS") as e:
            resolve_address(None, {})
        assert e.value.exit_code == 3

    def test_odd_paths_are_escaped(self, tmp_path: Path, sockets: list[socket.socket]) -> None:
        """Spaces, commas, semicolons, backslashes survive dbus-fast's address parser."""
        runtime = tmp_path / "a b,c;d=e\\f*"
        (runtime / "systemd").mkdir(parents=True)
        _bind(runtime / "systemd/private", sockets)
        transport = resolve_address(None, {"XDG_RUNTIME_DIR": str(runtime)})
        assert parse_address(transport.address) == [
            ("unix", {"path": f"{runtime}/systemd/private"})
        ]


class TestConnectFailures:
    """Every way of not reaching a manager is one ManagerUnreachableError naming the address."""

    async def test_missing_socket(self, tmp_path: Path) -> None:
        """A path with nothing behind it."""
        address = f"unix:path={tmp_path}/nothing"
        with pytest.raises(ManagerUnreachableError, match=f"unreachable at {re.escape(address)}"):
            await ManagerConnection.connect(Transport(address, "explicit"), timeout=2)

    async def test_refused(self, tmp_path: Path, sockets: list[socket.socket]) -> None:
        """A stale socket nobody listens on."""
        _bind(tmp_path / "stale", sockets, listen=False)
        with pytest.raises(ManagerUnreachableError, match="refused"):
            await ManagerConnection.connect(Transport(f"unix:path={tmp_path}/stale", "private"))

    async def test_silent_peer(self, tmp_path: Path, sockets: list[socket.socket]) -> None:
        """A socket that accepts but never authenticates runs into the timeout."""
        _bind(tmp_path / "mute", sockets)
        async with asyncio.timeout(5):
            with pytest.raises(ManagerUnreachableError, match="timed out"):
                await ManagerConnection.connect(
                    Transport(f"unix:path={tmp_path}/mute", "private"), timeout=0.2
                )

    async def test_garbage_address(self) -> None:
        """An address dbus-fast cannot parse."""
        with pytest.raises(ManagerUnreachableError, match="nonsense"):
            await ManagerConnection.connect(Transport("nonsense", "explicit"))


class TestPipelinedAuth:
    """BEGIN goes out with AUTH, before the server's OK, as sd-bus clients send it."""

    async def test_begin_before_ok(self, tmp_path: Path) -> None:
        """A server that withholds OK until it has read BEGIN still gets a connection.

        A client that waits for OK before sending BEGIN deadlocks here; that client is what
        makes systemd 252's private socket miss the first message (see _PipelinedAuthBus).
        """
        received: list[bytes] = []

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            received.append(await reader.readuntil(b"BEGIN\r\n"))
            writer.write(b"OK 0123456789abcdef0123456789abcdef\r\n")
            await reader.readexactly(len(_HELLO))
            writer.write(_hello_reply())
            await writer.drain()
            await reader.read()
            writer.close()

        server = await asyncio.start_unix_server(serve, path=str(tmp_path / "peer"))
        async with server:
            transport = Transport(f"unix:path={tmp_path}/peer", "explicit")
            connection = await ManagerConnection.connect(transport, timeout=2)
            assert not connection.peer
            await connection.close()
        assert received[0].startswith(b"\0AUTH EXTERNAL ")
        assert received[0].endswith(b"\r\nBEGIN\r\n")


class TestDbusFastInternals:
    """The private dbus-fast hooks the pipelined authentication overrides still exist."""

    @pytest.mark.parametrize("name", ["_inner_authenticate"])
    def test_hook_present(self, name: str) -> None:
        """A dbus-fast release that renames these would silently bring back the connect hang."""
        assert inspect.iscoroutinefunction(getattr(dbus_fast.aio.MessageBus, name))

"""Hostile neighbours: nobody gets in over HTTP, heal writes nowhere it should not, no shell."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import ipaddress
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from daemonkit import eventually, http_get, start_daemon, unit_file
from helpers import parse_python
from provenanced.config import Settings
from provenanced.daemon.actions import Healer
from provenanced.fs.facts import FactReader
from provenanced.model import DaemonStatus, ExpectedLink, Finding, FindingKind, Tier, UnitDir
from provenanced.sandbox import Sandbox
from provenanced.sinks.http import parse_listen, start_http_server
from provenanced.sinks.metrics import Telemetry

pytestmark = pytest.mark.fault

ROOT = Path(__file__).parents[2]
SRC = ROOT / "src" / "provenanced"
T = TypeVar("T")


# --- no shell -------------------------------------------------------------------------------

_SHELL_FUNCTIONS = frozenset(
    {"system", "popen", "getoutput", "getstatusoutput", "create_subprocess_shell", "spawnlp"}
)
_PROCESS_FUNCTIONS = frozenset({"run", "Popen", "call", "check_call", "check_output"})


def _subprocess_names(tree: ast.AST) -> set[str]:
    """Names bound by ``from subprocess import ...`` in a module."""
    return {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == "subprocess"
        for alias in node.names
    }


def _shell_uses(tree: ast.AST) -> list[str]:
    """Calls that hand a string to a shell, or a command line as one string."""
    imported = _subprocess_names(tree)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else ""
        name = func.id if isinstance(func, ast.Name) else name
        if name in _SHELL_FUNCTIONS:
            found.append(f"line {node.lineno}: {name}()")
        for keyword in node.keywords:
            if keyword.arg == "shell" and not (
                isinstance(keyword.value, ast.Constant) and keyword.value.value is False
            ):
                found.append(f"line {node.lineno}: shell=")
        spawns = (
            isinstance(func, ast.Attribute)
            and isinstance(func.value, ast.Name)
            and func.value.id == "subprocess"
        ) or (isinstance(func, ast.Name) and func.id in imported)
        if spawns and name in _PROCESS_FUNCTIONS and node.args:
            first = node.args[0]
            if isinstance(first, ast.JoinedStr | ast.BinOp) or (
                isinstance(first, ast.Constant) and isinstance(first.value, str)
            ):
                found.append(f"line {node.lineno}: {name}() with a command string")
    return found


class TestNoShell:
    def test_no_module_shells_out(self) -> None:
        """No source file runs a shell or passes a command line as one string (argv lists only)."""
        offenders = {
            str(path.relative_to(ROOT)): uses
            for path in sorted(SRC.rglob("*.py"))
            if (uses := _shell_uses(parse_python(path.read_text(), str(path))))
        }
        assert offenders == {}

    def test_the_check_catches_what_it_looks_for(self) -> None:
        """The scan flags each pattern it claims to, so a clean result means something."""
        code = (
            "import os, subprocess\n"
            "os.system('x')\n"
            "subprocess.run('ls ' + name)\n"
            "subprocess.Popen(['ls'], shell=True)\n"
            "subprocess.check_output(f'ls {name}')\n"
            "subprocess.run(['ls', name], shell=False)\n"
            "from subprocess import call\n"
            "call('rm -rf ' + name)\n"
            "conn.call('ListUnits')\n"
        )
        assert len(_shell_uses(parse_python(code))) == 5


# --- HTTP --------------------------------------------------------------------------------------


class TestLoopbackByDefault:
    def test_default_listen_address_is_loopback_only(self) -> None:
        """metrics.listen defaults to a host that resolves to loopback addresses only."""
        host, _ = parse_listen(Settings().metrics.listen)
        addresses = {info[4][0] for info in socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)}
        assert addresses and all(ipaddress.ip_address(a).is_loopback for a in addresses)

    def test_default_host_binds_loopback(self) -> None:
        """A server on the default host is bound to loopback (port 0: any free one)."""
        host, _ = parse_listen(Settings().metrics.listen)
        server = start_http_server(f"{host}:0", Telemetry(DaemonStatus).registry, DaemonStatus)
        try:
            assert ipaddress.ip_address(server.address[0]).is_loopback
        finally:
            server.stop()

    def test_socket_unit_listens_on_loopback(self) -> None:
        """The packaged socket-activation unit binds loopback too."""
        text = (ROOT / "packaging/systemd/provenanced.socket").read_text()
        streams = [
            line.split("=", 1)[1] for line in text.splitlines() if line.startswith("ListenStream=")
        ]
        assert streams
        for stream in streams:
            host, _ = parse_listen(stream)
            assert ipaddress.ip_address(host).is_loopback


_ABUSE = (
    b"POST /metrics HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
    b"DELETE /api/v1/findings HTTP/1.1\r\n\r\n",
    b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1\r\n" + b"X-H: v\r\n" * 150 + b"\r\n",
    b"\x00\xff\xfe garbage \r\n\r\n",
    b"GET /../../etc/passwd HTTP/1.1\r\n\r\n",
)


def _send(address: tuple[str, int], data: bytes) -> bytes:
    with socket.create_connection(address, timeout=10) as sock:
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            sock.sendall(data)
        with contextlib.suppress(ConnectionResetError, TimeoutError):
            return sock.recv(65536)
    return b""


def _status(reply: bytes) -> int:
    """The status code of a reply; a request without a version gets an HTTP/0.9 error page."""
    if reply.startswith(b"HTTP/"):
        return int(reply.split(b" ", 2)[1])
    code = reply.split(b"Error code: ", 1)[1][:3] if b"Error code: " in reply else b"0"
    return int(code)


class TestHttpAbuseAgainstTheDaemon:
    async def test_bad_requests_do_not_harm_the_running_daemon(
        self, fresh_sandbox: Sandbox
    ) -> None:
        """Non-GET, oversized, malformed and idle connections get refused; detection carries on."""
        async with start_daemon(fresh_sandbox) as running:
            assert running.daemon.http is not None
            address = running.daemon.http.address
            idle = [socket.create_connection(address, timeout=10) for _ in range(20)]
            try:
                replies = await _in_thread(lambda: [_send(address, data) for data in _ABUSE])
                assert [_status(reply) for reply in replies] == [405, 405, 414, 431, 400, 404]
                extra = unit_file(fresh_sandbox.config_dir, "after-abuse.service")
                await eventually(lambda: running.has(FindingKind.UNMANAGED_UNIT, extra))
                status, body = await _in_thread(lambda: http_get(address, "/api/v1/findings"))
                assert status == 200 and b"after-abuse.service" in body
                assert running.alive()
            finally:
                for sock in idle:
                    sock.close()


async def _in_thread(func: Callable[[], T]) -> T:
    """Blocking socket work off the loop, so the in-process daemon keeps running meanwhile."""
    return await asyncio.to_thread(func)


# --- heal boundaries -------------------------------------------------------------------------


@pytest.fixture
def home(tmp_path: Path) -> Path:
    units = tmp_path / "home/.config/systemd/user"
    units.mkdir(parents=True)
    store = tmp_path / "nix/store"
    store.mkdir(parents=True)
    (store / "aaaa-web.service").write_text("[Service]\nExecStart=/bin/true\n")
    return tmp_path / "home"


def _heal(home: Path, path: Path, unit_dirs: tuple[UnitDir, ...]) -> tuple[bool, str]:
    target = home.parent / "nix/store/aaaa-web.service"
    finding = Finding(FindingKind.LINK_REPLACED, "web.service", str(path), "critical", "test")
    outcome = Healer(str(home.parent / "state"), str(home)).heal(
        finding,
        FactReader().read(str(path)),
        ExpectedLink(str(path), str(target), str(target), None),
        unit_dirs,
    )
    return outcome.ok, outcome.detail


class TestHealBoundaries:
    """What tests/unit/test_actions.py does not cover yet: other tiers, dot-dot, linked ancestors."""

    @pytest.mark.parametrize("tier", [Tier.ADMIN, Tier.VENDOR, Tier.GENERATOR, Tier.TRANSIENT])
    def test_refuses_directories_that_are_not_the_users(self, home: Path, tier: Tier) -> None:
        """A unit directory outside the user tiers (e.g. /etc/systemd/user) is never written."""
        units = home / ".config/systemd/user"
        path = units / "web.service"
        path.write_text("x")
        ok, detail = _heal(home, path, (UnitDir(str(units), tier, 0),))
        assert not ok and "not inside a user unit directory" in detail
        assert path.read_text() == "x"

    def test_refuses_dot_dot_out_of_the_unit_directory(self, home: Path) -> None:
        """A path that climbs out of the unit directory with '..' is refused."""
        units = home / ".config/systemd/user"
        victim = home / ".config/systemd/web.service"
        victim.write_text("x")
        ok, _ = _heal(home, units / ".." / "web.service", (UnitDir(str(units), Tier.CONFIG, 0),))
        assert not ok
        assert victim.read_text() == "x" and not victim.is_symlink()

    @pytest.mark.parametrize("linked", [".config/systemd/user", ".config"])
    def test_refuses_a_unit_directory_reached_through_a_link(
        self, home: Path, tmp_path: Path, linked: str
    ) -> None:
        """The unit directory itself, or an ancestor of it, being a symlink is refused too."""
        real = tmp_path / "elsewhere"
        (home / linked).rename(real)
        (home / linked).symlink_to(real)
        units = home / ".config/systemd/user"
        path = units / "web.service"
        path.write_text("x")
        ok, detail = _heal(home, path, (UnitDir(str(units), Tier.CONFIG, 0),))
        assert not ok and "symlink" in detail
        assert path.read_text() == "x" and not path.is_symlink()

    def test_never_replaces_a_file_that_appears_meanwhile(self, home: Path) -> None:
        """The link is created, never renamed over: a file written after the quarantine move stays."""
        units = home / ".config/systemd/user"
        path = units / "web.service"
        path.write_text("first")
        healer = Healer(str(home.parent / "state"), str(home))
        quarantine = healer._quarantine
        written = threading.Event()

        def quarantine_then_write(finding: Finding, examined: object) -> str:
            moved = quarantine(finding, examined)  # type: ignore[arg-type]
            path.write_text("second, written during the heal")
            written.set()
            return moved

        healer._quarantine = quarantine_then_write  # type: ignore[method-assign]
        target = home.parent / "nix/store/aaaa-web.service"
        outcome = healer.heal(
            Finding(FindingKind.LINK_REPLACED, "web.service", str(path), "critical", "test"),
            FactReader().read(str(path)),
            ExpectedLink(str(path), str(target), str(target), None),
            (UnitDir(str(units), Tier.CONFIG, 0),),
        )
        assert written.is_set()
        assert not outcome.ok and "written again" in outcome.detail
        assert path.read_text() == "second, written during the heal"
        quarantined = [p for p in (home.parent / "state").rglob("web.service")]
        assert [p.read_text() for p in quarantined] == ["first"]

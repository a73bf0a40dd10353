"""The sinks against real things: an HTTP server on loopback, TLS made by openssl, journald."""

from __future__ import annotations

import contextlib
import gzip
import http.client
import json
import logging
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import structlog

from helpers import wait_until
from provenanced.errors import ConfigError
from provenanced.logging import configure_logging
from provenanced.model import DaemonStatus, Finding, FindingKind, Transition
from provenanced.sinks import http as http_sink
from provenanced.sinks import journal as journal_ids
from provenanced.sinks.http import MAX_CONNECTIONS, HttpServer, TlsFiles, start_http_server
from provenanced.sinks.journal import JournalSink
from provenanced.sinks.metrics import Telemetry

pytestmark = pytest.mark.integration

NOBODY = 65534
CATALOG = Path(__file__).parents[2] / "packaging" / "journald" / "provenanced.catalog"
JOURNAL_DIRS = (Path("/run/log/journal"), Path("/var/log/journal"))


class _Status:
    """The engine's swappable status reference, as a callable."""

    def __init__(self) -> None:
        self.value = DaemonStatus()

    def __call__(self) -> DaemonStatus:
        return self.value


@dataclass
class _Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes


def _finding(unit: str = "web.service", kind: FindingKind = FindingKind.LINK_REPLACED) -> Finding:
    path = f"/home/u/.config/systemd/user/{unit}"
    return Finding(kind, unit, path, "critical", "divergent", since=1.0)


def _request(
    address: tuple[str, int],
    path: str,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    context: ssl.SSLContext | None = None,
) -> _Reply:
    host, port = address
    conn: http.client.HTTPConnection
    if context is None:
        conn = http.client.HTTPConnection(host, port, timeout=10)
    else:
        conn = http.client.HTTPSConnection(host, port, timeout=10, context=context)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        return _Reply(response.status, response.headers, response.read())
    finally:
        conn.close()


def _raw(address: tuple[str, int], data: bytes) -> bytes:
    """Send raw bytes and read the whole reply, for requests http.client refuses to build."""
    with socket.create_connection(address, timeout=10) as sock:
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            sock.sendall(data)
        chunks = []
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                chunks.append(chunk)
    return b"".join(chunks)


def _status_line(reply: bytes) -> bytes:
    return reply.split(b"\r\n", 1)[0]


@pytest.fixture(scope="module")
def shared_status() -> _Status:
    return _Status()


@pytest.fixture
def status(shared_status: _Status) -> _Status:
    """The module's status reference, reset to an empty status for each test."""
    shared_status.value = DaemonStatus()
    return shared_status


@pytest.fixture(scope="module")
def telemetry(shared_status: _Status) -> Telemetry:
    return Telemetry(shared_status)


@pytest.fixture(scope="module")
def server(telemetry: Telemetry, shared_status: _Status) -> Iterator[HttpServer]:
    """One server for the module: stopping one waits out serve_forever's 0.5 s poll."""
    endpoint = start_http_server(
        "127.0.0.1:0", telemetry.registry, shared_status, version=lambda: telemetry.version
    )
    yield endpoint
    endpoint.stop()


class _CountingCollector:
    """Yields nothing; counts how often the registry was rendered."""

    def __init__(self) -> None:
        self.renders = 0

    def collect(self) -> Iterator[Any]:
        self.renders += 1
        return iter(())


# --- HTTP ------------------------------------------------------------------------------------


class TestEndpoints:
    def test_landing_page_links_every_endpoint(self, server: HttpServer) -> None:
        """/ is a small HTML page linking the other endpoints."""
        reply = _request(server.address, "/")
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("text/html")
        for path in ("/metrics", "/-/healthy", "/-/ready", "/api/v1/findings"):
            assert f'href="{path}"'.encode() in reply.body

    def test_healthy(self, server: HttpServer) -> None:
        """/-/healthy answers 200 whatever the status."""
        assert _request(server.address, "/-/healthy").status == 200

    @pytest.mark.parametrize(
        ("ready", "connected", "code"),
        [(False, False, 503), (True, False, 503), (False, True, 503), (True, True, 200)],
    )
    def test_ready(
        self, server: HttpServer, status: _Status, ready: bool, connected: bool, code: int
    ) -> None:
        """/-/ready is 200 only after the first audit and while the manager is connected."""
        status.value = DaemonStatus(ready=ready, manager_connected=connected)
        assert _request(server.address, "/-/ready").status == code

    def test_findings_api(self, server: HttpServer, status: _Status) -> None:
        """/api/v1/findings is the audit --json shape: units, findings, stale."""
        findings = (_finding("a.service"), _finding("b.service", FindingKind.MASKED))
        status.value = DaemonStatus(findings=findings, units_audited=12, behind=True)
        reply = _request(server.address, "/api/v1/findings?ignored=1")
        assert reply.status == 200
        assert reply.headers["Content-Type"] == "application/json"
        assert json.loads(reply.body) == {
            "units": 12,
            "findings": [f.to_json() for f in findings],
            "stale": True,
        }

    def test_findings_api_with_undecodable_path(self, server: HttpServer, status: _Status) -> None:
        """A path holding non-UTF-8 bytes is served as valid JSON with an escape."""
        finding = replace(_finding(), path=os.fsdecode(b"/u/\xffbad.service"))
        status.value = DaemonStatus(findings=(finding,))
        document = json.loads(_request(server.address, "/api/v1/findings").body)
        assert document["findings"][0]["path"] == "/u/\udcffbad.service"

    def test_metrics_text(self, server: HttpServer, status: _Status) -> None:
        """/metrics is Prometheus text by default and renders the current status."""
        status.value = DaemonStatus(findings=(_finding(),), ready=True)
        reply = _request(server.address, "/metrics")
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        series = (
            b'provenanced_finding{kind="link-replaced",'
            b'path="/home/u/.config/systemd/user/web.service",'
            b'severity="critical",unit="web.service"} 1.0'
        )
        assert series in reply.body
        assert b"provenanced_ready 1.0" in reply.body

    def test_metrics_openmetrics(self, server: HttpServer) -> None:
        """An OpenMetrics Accept header gets OpenMetrics, terminated by # EOF."""
        accept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
        reply = _request(server.address, "/metrics", headers={"Accept": accept})
        assert reply.headers["Content-Type"].startswith("application/openmetrics-text")
        assert reply.body.endswith(b"# EOF\n")

    def test_metrics_gzip(self, server: HttpServer) -> None:
        """A scraper that accepts gzip gets a compressed body."""
        reply = _request(server.address, "/metrics", headers={"Accept-Encoding": "gzip"})
        assert reply.headers["Content-Encoding"] == "gzip"
        assert b"provenanced_build_info" in gzip.decompress(reply.body)

    def test_head(self, server: HttpServer) -> None:
        """HEAD gets GET's status and headers without a body."""
        get = _request(server.address, "/-/healthy")
        head = _request(server.address, "/-/healthy", method="HEAD")
        assert head.status == 200
        assert head.body == b""
        assert head.headers["Content-Length"] == str(len(get.body))

    @pytest.mark.parametrize("path", ["/nope", "/metrics/", "/metricsx", "/api/v1", "/-/"])
    def test_unknown_paths_are_404(self, server: HttpServer, path: str) -> None:
        """Only the documented paths exist."""
        assert _request(server.address, path).status == 404

    @pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "BREW"])
    def test_other_methods_are_405_with_allow(self, server: HttpServer, method: str) -> None:
        """Anything but GET and HEAD is 405 naming the allowed methods."""
        reply = _request(server.address, "/metrics", method=method)
        assert reply.status == 405
        assert reply.headers["Allow"] == "GET, HEAD"


# 20 header lines of 1 KB: each is short and they are few, but together over the 16 KiB head.
_PADDED_HEADERS = b"".join(b"X-Pad-%02d: %s\r\n" % (i, b"a" * 1000) for i in range(20))


class TestMetricsRendering:
    def test_rendered_once_per_change_not_per_scrape(self) -> None:
        """Scrapes between changes get the same bytes; a counter or the status moving re-renders."""
        status = _Status()
        telemetry = Telemetry(status)
        counting = _CountingCollector()
        telemetry.registry.register(counting)
        endpoint = start_http_server(
            "127.0.0.1:0", telemetry.registry, status, version=lambda: telemetry.version
        )
        try:
            first = _request(endpoint.address, "/metrics").body
            assert _request(endpoint.address, "/metrics").body == first
            assert counting.renders == 1

            telemetry.record_overflow()
            assert b"provenanced_inotify_overflows_total 1.0" in (
                _request(endpoint.address, "/metrics").body
            )
            status.value = DaemonStatus(findings=(_finding(),))
            assert b'provenanced_finding{kind="link-replaced"' in (
                _request(endpoint.address, "/metrics").body
            )
            assert counting.renders == 3

            # Each format keeps its own bytes: gzip is not served to a client that did not ask.
            zipped = _request(endpoint.address, "/metrics", headers={"Accept-Encoding": "gzip"})
            assert b'kind="link-replaced"' in gzip.decompress(zipped.body)
            assert b'kind="link-replaced"' in _request(endpoint.address, "/metrics").body
            assert counting.renders == 4
        finally:
            endpoint.stop()


class TestAbuse:
    """Malformed and oversized requests get an error status and the server carries on."""

    @pytest.mark.parametrize(
        ("request_bytes", "expected"),
        [
            (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", b"414"),
            (b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n", b"431"),
            (b"GET / HTTP/1.1\r\n" + b"X-H: v\r\n" * 150 + b"\r\n", b"431"),
            (b"GET / HTTP/1.1\r\n" + _PADDED_HEADERS + b"\r\n", b"431"),
            (b"GARBAGE\r\n\r\n", b"400"),
            (b"GET / HTTP/1.1 extra\r\n\r\n", b"400"),
            (b"GET / HTTP/9.9\r\n\r\n", b"505"),
            (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n", b"400"),
        ],
        ids=[
            "long-request-line",
            "long-header",
            "many-headers",
            "head-over-16k",
            "garbage",
            "four-words",
            "version",
            "tls",
        ],
    )
    def test_bad_requests(self, server: HttpServer, request_bytes: bytes, expected: bytes) -> None:
        """Each bad request gets a status line with its code; the next good request is served."""
        status_line = _status_line(_raw(server.address, request_bytes))
        assert status_line.startswith(b"HTTP/1.0 " + expected + b" "), status_line
        assert _request(server.address, "/-/healthy").status == 200

    def test_idle_client_does_not_block_others(self, server: HttpServer) -> None:
        """A client that connects and sends nothing holds one thread, not the server."""
        with socket.create_connection(server.address, timeout=10):
            assert _request(server.address, "/-/healthy").status == 200

    def test_connections_over_the_limit_get_503(self, server: HttpServer) -> None:
        """With every slot held by an idle client, the next one gets 503; a freed slot serves again."""
        held = [
            socket.create_connection(server.address, timeout=10) for _ in range(MAX_CONNECTIONS)
        ]
        try:
            wait_until(
                lambda: _status_line(_raw(server.address, b"GET / HTTP/1.0\r\n\r\n")).startswith(
                    b"HTTP/1.0 503 "
                ),
                message="a 503 once every slot is taken",
            )
        finally:
            for sock in held:
                sock.close()
        wait_until(lambda: _request(server.address, "/-/healthy").status == 200)

    def test_a_trickled_head_is_dropped_at_its_deadline(
        self, server: HttpServer, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A client sending its head a byte at a time is closed at the head's one deadline."""
        monkeypatch.setattr(http_sink, "_HEAD_SECONDS", 1.0)
        trickle = iter(b"GET /metrics HTTP/1.1\r\nX-Slow: " + b"a" * 10000)
        with socket.create_connection(server.address, timeout=0.2) as sock:

            def closed() -> bool:
                """Each 0.2 s without an answer, send one more byte; True once the server hangs up."""
                try:
                    return sock.recv(1024) == b""
                except TimeoutError:
                    sock.sendall(bytes([next(trickle)]))
                    return False
                except ConnectionResetError:
                    return True

            wait_until(closed, timeout=30, interval=0, message="the server closing the trickle")

    def test_failing_status_is_500(self) -> None:
        """When get_status raises, scrapes get 500 and the server keeps serving."""

        def broken() -> DaemonStatus:
            raise RuntimeError("engine bug")

        failing = start_http_server("127.0.0.1:0", Telemetry(broken).registry, broken)
        try:
            assert _request(failing.address, "/metrics").status == 500
            assert _request(failing.address, "/api/v1/findings").status == 500
            assert _request(failing.address, "/-/healthy").status == 200
        finally:
            failing.stop()


class TestListen:
    def test_port_zero_reports_the_real_port(self, server: HttpServer) -> None:
        """address is the bound host and the port the kernel chose."""
        host, port = server.address
        assert host == "127.0.0.1"
        assert port > 0

    def test_ipv6_loopback(self, telemetry: Telemetry, status: _Status) -> None:
        """[::1]:port listens on the IPv6 loopback."""
        endpoint = start_http_server("[::1]:0", telemetry.registry, status)
        try:
            assert endpoint.address[0] == "::1"
            assert _request(endpoint.address, "/-/healthy").status == 200
        finally:
            endpoint.stop()

    def test_address_in_use_is_a_config_error(
        self, server: HttpServer, telemetry: Telemetry, status: _Status
    ) -> None:
        """Binding a taken port raises one clear ConfigError line."""
        host, port = server.address
        with pytest.raises(ConfigError, match=f"cannot listen on {host}:{port}: .*in use"):
            start_http_server(f"{host}:{port}", telemetry.registry, status)

    def test_unresolvable_host_is_a_config_error(
        self, telemetry: Telemetry, status: _Status
    ) -> None:
        """A host that does not resolve raises ConfigError."""
        with pytest.raises(ConfigError, match=r"cannot listen on no-such-host\.invalid:0"):
            start_http_server("no-such-host.invalid:0", telemetry.registry, status)

    def test_stop_releases_the_port(self, telemetry: Telemetry, status: _Status) -> None:
        """After stop() (safe to repeat) the same address can be bound again."""
        first = start_http_server("127.0.0.1:0", telemetry.registry, status)
        host, port = first.address
        first.stop()
        first.stop()
        assert first.address == (host, port)
        second = start_http_server(f"{host}:{port}", telemetry.registry, status)
        second.stop()


class TestSocketActivation:
    def test_serves_on_an_inherited_listening_socket(
        self, telemetry: Telemetry, status: _Status
    ) -> None:
        """Given a listening socket's fd, the server serves on it instead of binding."""
        sock = socket.create_server(("127.0.0.1", 0))
        expected = sock.getsockname()
        endpoint = start_http_server("127.0.0.1:1", telemetry.registry, status, fd=sock.detach())
        try:
            assert endpoint.address == expected
            assert _request(endpoint.address, "/-/healthy").status == 200
        finally:
            endpoint.stop()

    def test_rejects_a_socket_that_is_not_listening(
        self, telemetry: Telemetry, status: _Status
    ) -> None:
        """A bound but not listening socket is a ConfigError, and its fd is left open."""
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            bound, before = sock.getsockname(), os.fstat(sock.fileno())
            with pytest.raises(ConfigError, match="not a listening TCP socket"):
                start_http_server("127.0.0.1:1", telemetry.registry, status, fd=sock.fileno())
            # A closed fd fails fstat, or (reused) names another file: it must be this socket.
            after = os.fstat(sock.fileno())
            assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino)
            assert sock.getsockname() == bound

    def test_rejects_a_non_socket(self, telemetry: Telemetry, status: _Status) -> None:
        """An fd that is not a socket is a ConfigError."""
        read_end, write_end = os.pipe()
        try:
            with pytest.raises(ConfigError, match=f"inherited fd {read_end} is not a socket"):
                start_http_server("127.0.0.1:1", telemetry.registry, status, fd=read_end)
        finally:
            os.close(read_end)
            os.close(write_end)

    def test_systemd_socket_activate(self) -> None:
        """Under systemd-socket-activate, listen_fds() hands the socket to the server."""
        activate = shutil.which("systemd-socket-activate")
        assert activate, "systemd-socket-activate (package systemd) is needed"
        with socket.create_server(("127.0.0.1", 0)) as probe:
            port = probe.getsockname()[1]
        code = (
            "import signal\n"
            "from systemd import daemon\n"
            "from provenanced.model import DaemonStatus\n"
            "from provenanced.sinks.http import start_http_server\n"
            "from provenanced.sinks.metrics import Telemetry\n"
            "status = lambda: DaemonStatus(ready=True, manager_connected=True)\n"
            "(fd,) = daemon.listen_fds()\n"
            "start_http_server('127.0.0.1:1', Telemetry(status).registry, status, fd=fd)\n"
            "signal.pause()\n"
        )
        proc = subprocess.Popen(
            [activate, "-l", f"127.0.0.1:{port}", sys.executable, "-c", code],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            address = ("127.0.0.1", port)
            wait_until(lambda: _connectable(address), message="systemd-socket-activate listens")
            assert _request(address, "/-/ready").status == 200
        finally:
            proc.terminate()
            proc.wait(timeout=10)


def _connectable(address: tuple[str, int]) -> bool:
    try:
        socket.create_connection(address, timeout=1).close()
    except OSError:
        return False
    return True


# --- TLS -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Pki:
    ca: Path
    server: TlsFiles
    client_cert: Path
    client_key: Path
    other_cert: Path
    other_key: Path


def _openssl(*args: str | Path, cwd: Path) -> None:
    subprocess.run(["openssl", *map(str, args)], cwd=cwd, check=True, capture_output=True)


def _make_ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", *_EC, "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem",
             "-days", "2", "-subj", f"/CN={name}", cwd=d)  # fmt: skip


def _make_cert(d: Path, name: str, ca: str, extensions: str) -> None:
    _openssl("req", *_EC, "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", f"/CN={name}", cwd=d)  # fmt: skip
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-out", f"{name}.pem", "-days", "2",
             "-extfile", "ext.cnf", "-extensions", extensions, cwd=d)  # fmt: skip


# A refused handshake surfaces as an SSL alert, or as a reset when the server closes first.
_REFUSED = (ssl.SSLError, ConnectionResetError, BrokenPipeError)
_EC = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> _Pki:
    """A CA, a server cert for 127.0.0.1, a client cert, and a client cert from another CA."""
    d = tmp_path_factory.mktemp("pki")
    (d / "ext.cnf").write_text(
        "[server]\nsubjectAltName = IP:127.0.0.1, DNS:localhost\nextendedKeyUsage = serverAuth\n"
        "[client]\nextendedKeyUsage = clientAuth\n"
    )
    _make_ca(d, "ca")
    _make_ca(d, "other-ca")
    _make_cert(d, "server", "ca", "server")
    _make_cert(d, "client", "ca", "client")
    _make_cert(d, "other", "other-ca", "client")
    return _Pki(
        ca=d / "ca.pem",
        server=TlsFiles(str(d / "server.pem"), str(d / "server.key")),
        client_cert=d / "client.pem",
        client_key=d / "client.key",
        other_cert=d / "other.pem",
        other_key=d / "other.key",
    )


def _client(pki: _Pki, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca))
    if cert is not None:
        context.load_cert_chain(str(cert), str(key))
    return context


@pytest.fixture(scope="module")
def tls_server(pki: _Pki, telemetry: Telemetry, shared_status: _Status) -> Iterator[HttpServer]:
    endpoint = start_http_server("127.0.0.1:0", telemetry.registry, shared_status, tls=pki.server)
    yield endpoint
    endpoint.stop()


@pytest.fixture(scope="module")
def mtls_server(pki: _Pki, telemetry: Telemetry, shared_status: _Status) -> Iterator[HttpServer]:
    files = TlsFiles(pki.server.cert, pki.server.key, client_ca=str(pki.ca))
    endpoint = start_http_server("127.0.0.1:0", telemetry.registry, shared_status, tls=files)
    yield endpoint
    endpoint.stop()


class TestTls:
    def test_https(self, tls_server: HttpServer, pki: _Pki) -> None:
        """A client trusting the CA gets metrics over HTTPS, hostname verified."""
        reply = _request(tls_server.address, "/metrics", context=_client(pki))
        assert reply.status == 200
        assert b"provenanced_build_info" in reply.body

    def test_plain_http_to_tls_port_does_not_hurt(self, tls_server: HttpServer, pki: _Pki) -> None:
        """A plain-HTTP client gets no answer and the server goes on serving HTTPS."""
        reply = _raw(tls_server.address, b"GET /metrics HTTP/1.0\r\n\r\n")
        assert b"provenanced_" not in reply
        assert _request(tls_server.address, "/-/healthy", context=_client(pki)).status == 200

    def test_mtls_refuses_a_client_without_cert(self, mtls_server: HttpServer, pki: _Pki) -> None:
        """With a client CA configured, a client presenting no cert is refused."""
        with pytest.raises(_REFUSED):
            _request(mtls_server.address, "/metrics", context=_client(pki))

    def test_mtls_refuses_a_cert_from_another_ca(self, mtls_server: HttpServer, pki: _Pki) -> None:
        """A client cert not signed by the configured CA is refused."""
        context = _client(pki, pki.other_cert, pki.other_key)
        with pytest.raises(_REFUSED):
            _request(mtls_server.address, "/metrics", context=context)

    def test_mtls_accepts_a_signed_client(self, mtls_server: HttpServer, pki: _Pki) -> None:
        """A client cert signed by the CA is served, also after refused clients."""
        with pytest.raises(_REFUSED):
            _request(mtls_server.address, "/-/healthy", context=_client(pki))
        context = _client(pki, pki.client_cert, pki.client_key)
        assert _request(mtls_server.address, "/-/healthy", context=context).status == 200

    @pytest.mark.parametrize(
        ("files", "message"),
        [
            (lambda p: TlsFiles("/nonexistent.pem", p.server.key), "cannot load TLS cert"),
            (lambda p: TlsFiles(p.server.cert, str(p.client_key)), "cannot load TLS cert"),
            (
                lambda p: TlsFiles(p.server.cert, p.server.key, "/nonexistent-ca.pem"),
                "cannot load client CA /nonexistent-ca.pem",
            ),
        ],
        ids=["missing-cert", "mismatched-key", "missing-ca"],
    )
    def test_bad_files_are_config_errors(
        self,
        pki: _Pki,
        telemetry: Telemetry,
        status: _Status,
        files: Callable[[_Pki], TlsFiles],
        message: str,
    ) -> None:
        """Unloadable TLS files raise one ConfigError line before anything listens."""
        with pytest.raises(ConfigError, match=message) as info:
            start_http_server("127.0.0.1:0", telemetry.registry, status, tls=files(pki))
        assert "\n" not in str(info.value)


# --- journald --------------------------------------------------------------------------------


def _journal(*args: str, user: int | None = None) -> list[dict[str, Any]]:
    """Entries journalctl prints as JSON for these arguments (matches, options)."""
    result = subprocess.run(
        ["journalctl", "--no-pager", "-o", "json", *args],
        capture_output=True,
        text=True,
        check=True,
        user=user,
        group=user,
        extra_groups=[] if user is not None else None,
    )
    return [json.loads(line) for line in result.stdout.splitlines()]


def _wait_for_entries(*matches: str, count: int = 1) -> list[dict[str, Any]]:
    def found() -> list[dict[str, Any]]:
        entries = _journal(*matches)
        return entries if len(entries) >= count else []

    return wait_until(found, message=f"journal entries matching {matches}")


def _unit() -> str:
    return f"probe-{uuid.uuid4().hex[:12]}.service"


@pytest.fixture
def results() -> list[tuple[str, str]]:
    return []


@pytest.fixture
def sink(journald: object, results: list[tuple[str, str]]) -> JournalSink:
    return JournalSink(on_result=lambda sink, result: results.append((sink, result)))


class TestJournalRoundTrip:
    def test_transition_fields(self, sink: JournalSink, results: list[tuple[str, str]]) -> None:
        """A detected finding is read back with every documented field."""
        unit = _unit()
        finding = Finding(FindingKind.LINK_RETARGETED, unit, f"/u/{unit}", "critical", "outside")
        sink.send_transition(Transition(finding, "detected"))
        (entry,) = _wait_for_entries(
            f"MESSAGE_ID={journal_ids.DRIFT_DETECTED}", f"USER_UNIT={unit}"
        )
        assert entry["PRIORITY"] == "2"
        assert entry["SYSLOG_IDENTIFIER"] == "provenanced"
        assert entry["PROVENANCED_KIND"] == "link-retargeted"
        assert entry["PROVENANCED_PATH"] == f"/u/{unit}"
        assert entry["PROVENANCED_DETAIL"] == "outside"
        assert entry["PROVENANCED_SEVERITY"] == "critical"
        assert entry["_UID"] == str(os.getuid())
        assert results == [("journal", "ok")]

    @pytest.mark.parametrize(
        ("send", "message_id", "priority"),
        [
            (lambda s, f: s.send_transition(Transition(f, "resolved")), "DRIFT_RESOLVED", "5"),
            (lambda s, f: s.send_heal(True, f, "restored"), "HEAL_DONE", "5"),
            (lambda s, f: s.send_heal(False, f, "EROFS"), "HEAL_FAILED", "3"),
            (lambda s, f: s.send_job_unverified(f), "JOB_UNVERIFIED", "2"),
        ],
        ids=["resolved", "heal-done", "heal-failed", "job-unverified"],
    )
    def test_finding_messages(
        self,
        sink: JournalSink,
        send: Callable[[JournalSink, Finding], None],
        message_id: str,
        priority: str,
    ) -> None:
        """Each finding-related message arrives under its MESSAGE_ID with its priority."""
        unit = _unit()
        send(sink, _finding(unit))
        mid = getattr(journal_ids, message_id)
        (entry,) = _wait_for_entries(f"MESSAGE_ID={mid}", f"USER_UNIT={unit}")
        assert entry["PRIORITY"] == priority
        assert entry["PROVENANCED_PATH"] == f"/home/u/.config/systemd/user/{unit}"

    @pytest.mark.parametrize(
        ("ok", "message_id"), [(True, "RELOAD_DONE"), (False, "RELOAD_FAILED")]
    )
    def test_reload(self, sink: JournalSink, ok: bool, message_id: str) -> None:
        """A reload outcome arrives with its trigger and detail."""
        marker = uuid.uuid4().hex
        sink.send_reload(ok, "stale-load", marker)
        mid = getattr(journal_ids, message_id)
        (entry,) = _wait_for_entries(f"MESSAGE_ID={mid}", f"PROVENANCED_DETAIL={marker}")
        assert entry["PROVENANCED_TRIGGER"] == "stale-load"
        assert entry["PRIORITY"] == ("6" if ok else "3")

    def test_connection_lost(self, sink: JournalSink) -> None:
        """A lost connection arrives with the address and the error."""
        marker = uuid.uuid4().hex
        sink.send_connection_lost("unix:path=/run/user/0/bus", marker)
        mid = journal_ids.CONNECTION_LOST
        (entry,) = _wait_for_entries(f"MESSAGE_ID={mid}", f"PROVENANCED_DETAIL={marker}")
        assert entry["PROVENANCED_ADDRESS"] == "unix:path=/run/user/0/bus"
        assert entry["PRIORITY"] == "3"

    def test_values_cannot_inject_fields(self, sink: JournalSink) -> None:
        """A path full of newlines and NAME=value lines arrives as one value, injecting nothing."""
        unit, evil = _unit(), _unit()
        path = f"/x\nPRIORITY=0\nUSER_UNIT={evil}\nMESSAGE_ID={journal_ids.HEAL_DONE}\n"
        finding = Finding(FindingKind.UNSAFE_MODE, unit, path, "warning", "mode 0666")
        sink.send_transition(Transition(finding, "detected"))
        (entry,) = _wait_for_entries(f"USER_UNIT={unit}")
        assert entry["PROVENANCED_PATH"] == path
        assert entry["PRIORITY"] == "4"
        assert entry["MESSAGE_ID"] == journal_ids.DRIFT_DETECTED
        assert "\n" not in entry["MESSAGE"]
        assert _journal(f"USER_UNIT={evil}") == []

    def test_undecodable_path_bytes_arrive_verbatim(self, sink: JournalSink) -> None:
        """A path with bytes that are not UTF-8 is stored as exactly those bytes."""
        unit = _unit()
        path = os.fsdecode(b"/home/u/\xffbad.service")
        sink.send_transition(Transition(replace(_finding(unit), path=path), "detected"))
        (entry,) = _wait_for_entries(f"USER_UNIT={unit}")
        assert bytes(entry["PROVENANCED_PATH"]) == b"/home/u/\xffbad.service"


class TestUserUnitMatching:
    """``journalctl --user-unit U`` matches USER_UNIT=U together with _UID=<its own uid>."""

    def test_found_by_user_unit_for_the_sending_uid(self, sink: JournalSink) -> None:
        """Run by the uid that sent it, journalctl --user-unit finds the entry."""
        unit = _unit()
        sink.send_transition(Transition(_finding(unit), "detected"))
        _wait_for_entries(f"USER_UNIT={unit}")
        entries = _journal("--user-unit", unit)
        assert [e["MESSAGE_ID"] for e in entries] == [journal_ids.DRIFT_DETECTED]

    def test_other_uids_do_not_see_it_under_user_unit(
        self, journald: object, readable_dir: Path
    ) -> None:
        """An entry sent by uid 65534 is found by that uid's --user-unit, not by root's."""
        if os.geteuid() != 0:
            pytest.fail("switching to uid 65534 needs root")
        unit = _unit()
        _send_as(
            NOBODY, lambda: JournalSink().send_transition(Transition(_finding(unit), "detected"))
        )
        (entry,) = _wait_for_entries(f"USER_UNIT={unit}", f"_UID={NOBODY}")
        assert _journal("--user-unit", unit) == []
        # journald's files are root-only here, so hand uid 65534 a readable copy of them.
        copy = _copy_journal_files(readable_dir)
        seen = _journal("--directory", str(copy), "--user-unit", unit, user=NOBODY)
        assert [e["__CURSOR"] for e in seen] == [entry["__CURSOR"]]


def _send_as(uid: int, send: Callable[[], None]) -> None:
    """Run ``send`` in a forked child that has switched to ``uid``; journald sees that uid."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            send()
            code = 0
        finally:
            os._exit(code)
    _, wait_status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(wait_status) == 0


@pytest.fixture
def readable_dir() -> Iterator[Path]:
    """A directory every uid can read (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="provenanced-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def _copy_journal_files(directory: Path) -> Path:
    for source in JOURNAL_DIRS:
        for path in source.glob("*/*.journal"):
            target = directory / f"{path.parent.name}-{path.name}"
            shutil.copyfile(path, target)
            target.chmod(0o644)
    return directory


class TestFallback:
    def test_unreachable_journald_falls_back_to_stderr(self, journald: object) -> None:
        """With the journal socket missing, then stale, each entry becomes one JSON line on
        stderr, on_result hears "error", and nothing raises (in a private mount namespace)."""
        unit = _unit()
        code = (
            "import json, socket\n"
            "from provenanced.model import Finding, FindingKind, Transition\n"
            "from provenanced.sinks.journal import JOURNAL_SOCKET, JournalSink\n"
            "seen = []\n"
            "sink = JournalSink(on_result=lambda s, r: seen.append([s, r]))\n"
            f"f = Finding(FindingKind.MASKED, {unit!r}, '/p/x', 'critical', 'latent')\n"
            "sink.send_transition(Transition(f, 'detected'))\n"
            "stale = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n"
            "stale.bind(JOURNAL_SOCKET)\n"
            "stale.close()\n"
            "sink.send_connection_lost('unix:path=/x', 'EOF')\n"
            "print(json.dumps(seen))\n"
        )
        hide_socket = 'mount -t tmpfs tmpfs /run/systemd/journal && exec "$0" -c "$1"'
        result = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "--",
             "sh", "-c", hide_socket, sys.executable, code],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == [["journal", "error"], ["journal", "error"]]
        missing, stale = (json.loads(line) for line in result.stderr.splitlines())
        assert missing["event"] == stale["event"] == "journal.send_failed"
        assert "No such file or directory" in missing["error"]
        assert "Connection refused" in stale["error"]
        assert missing["entry"]["MESSAGE_ID"] == journal_ids.DRIFT_DETECTED
        assert missing["entry"]["USER_UNIT"] == unit
        assert missing["entry"]["PROVENANCED_PATH"] == "/p/x"
        assert stale["entry"]["MESSAGE_ID"] == journal_ids.CONNECTION_LOST


class TestCatalog:
    ALL_IDS = (
        "DRIFT_DETECTED", "DRIFT_RESOLVED", "RELOAD_DONE", "RELOAD_FAILED",
        "HEAL_DONE", "HEAL_FAILED", "JOB_UNVERIFIED", "CONNECTION_LOST",
    )  # fmt: skip

    @pytest.fixture
    def catalog_root(self, tmp_path: Path) -> Path:
        """An alternate root whose catalog database holds only provenanced's entries."""
        source = tmp_path / "usr/lib/systemd/catalog"
        source.mkdir(parents=True)
        shutil.copy(CATALOG, source)
        result = subprocess.run(
            ["journalctl", f"--root={tmp_path}", "--update-catalog"],
            capture_output=True,
            text=True,
            check=True,
        )
        assert result.stderr == ""
        return tmp_path

    def test_every_message_id_is_listed(self, catalog_root: Path) -> None:
        """--update-catalog accepts the file and --list-catalog shows each MESSAGE_ID once."""
        listed = subprocess.run(
            ["journalctl", f"--root={catalog_root}", "--list-catalog"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()
        ids = sorted(getattr(journal_ids, name) for name in self.ALL_IDS)
        assert sorted(line.split()[0] for line in listed) == ids
        assert all(line.split(maxsplit=1)[1].startswith("provenanced: ") for line in listed)

    def test_explanation_is_filled_in(self, catalog_root: Path, sink: JournalSink) -> None:
        """journalctl -x explains a real entry, with the unit and path substituted."""
        unit = _unit()
        sink.send_transition(Transition(_finding(unit), "detected"))
        _wait_for_entries(f"USER_UNIT={unit}")
        # -x reads /var/lib/systemd/catalog whatever --root says: show it ours, privately.
        database = catalog_root / "var/lib/systemd/catalog"
        script = (
            'mount --bind "$0" /var/lib/systemd/catalog && exec journalctl -x -q --no-pager "$1"'
        )
        result = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "--",
             "sh", "-c", script, str(database), f"USER_UNIT={unit}"],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        assert f"Subject: Drift detected in the definition of user unit {unit}" in result.stdout
        assert f"The file /home/u/.config/systemd/user/{unit}, which defines" in result.stdout
        assert "Kind: link-replaced (severity critical)" in result.stdout


class TestJournalLogging:
    @pytest.fixture(autouse=True)
    def _reset(self) -> Iterator[None]:
        """configure_logging changes global state; put structlog and the root logger back."""
        root = logging.getLogger()
        handlers, level = list(root.handlers), root.level
        yield
        structlog.reset_defaults()
        root.handlers = handlers
        root.setLevel(level)

    def test_events_become_native_fields(self, journald: object) -> None:
        """With format journal, an event's keys arrive as uppercase journal fields."""
        marker = uuid.uuid4().hex
        assert configure_logging("info", "journal") == "journal"
        log = structlog.get_logger("provenanced.daemon.engine")
        log.warning("drift.detected", unit="a.service", marker=marker)
        (entry,) = _wait_for_entries(f"MARKER={marker}")
        assert entry["MESSAGE"] == "drift.detected"
        assert entry["PRIORITY"] == "4"
        assert entry["UNIT"] == "a.service"
        assert entry["SYSLOG_IDENTIFIER"] == "provenanced"


class TestHostModeEndpoints:
    """One endpoint for every user: ?user= picks one user's findings, /-/ready waits for all."""

    def test_findings_per_user_and_readiness_of_all(self) -> None:
        """?user=NAME answers that user's document, an unknown user 404, no user all of them."""
        finding = _finding("a.service")
        statuses = {
            "alice": DaemonStatus(findings=(finding,), ready=True, manager_connected=True),
            "bob": DaemonStatus(units_audited=3),
        }
        endpoint = start_http_server(
            "127.0.0.1:0", Telemetry(lambda: statuses, host=True).registry, lambda: statuses
        )
        try:
            alice = json.loads(_request(endpoint.address, "/api/v1/findings?user=alice").body)
            assert alice == {
                "user": "alice",
                "units": 0,
                "findings": [finding.to_json()],
                "stale": False,
            }
            assert _request(endpoint.address, "/api/v1/findings?user=carol").status == 404
            every = json.loads(_request(endpoint.address, "/api/v1/findings").body)
            assert sorted(every["users"]) == ["alice", "bob"]
            ready = _request(endpoint.address, "/-/ready")
            assert (ready.status, ready.body) == (503, b"not ready: waiting for bob\n")
            metrics = _request(endpoint.address, "/metrics").body.decode()
            assert 'provenanced_ready{user="alice"} 1.0' in metrics
        finally:
            endpoint.stop()

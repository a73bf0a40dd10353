"""The HTTP endpoint: /metrics, health and readiness probes, the findings API, a landing page.

Built on the stdlib ``ThreadingHTTPServer`` rather than wsgiref + ``make_wsgi_app``: that app
serves metrics on *every* path and answers 405 only for non-GET, while we need our own routes,
a 405 with ``Allow``, HEAD, TLS wrapped per connection (a slow handshake must not stall the accept
loop) and serving on an inherited socket-activation fd. The exposition itself is
prometheus_client's (``choose_encoder`` for text vs OpenMetrics, ``gzip_accepted``).

A thread per connection, so a scrape never waits for the event loop (and /-/healthy can say the
loop is stuck instead of going silent with it). What bounds memory and time is ours, not the
stdlib's (its limits allowed 100 header lines of 64 KiB each, held for as long as the client kept
sending): at most ``MAX_CONNECTIONS`` at once (the next one gets 503), ``_HEAD_BYTES`` for the
request line and headers together (414 when the request line alone is over, else 431), and one
deadline, ``_HEAD_SECONDS`` from accept, for the TLS handshake and the whole head. Each connection
serves one request (HTTP/1.0); a malformed one gets 400 with a status line.

Over 400 lines on purpose: the routes and the limits that bound them share one parse of the
request head, and splitting them would hide which limit guards which read.
"""

from __future__ import annotations

import contextlib
import html
import io
import json
import math
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Final, cast
from urllib.parse import parse_qs, urlsplit

import structlog
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import gzip_accepted

from provenanced import __version__
from provenanced.errors import ConfigError
from provenanced.model import DaemonStatus
from provenanced.sinks.exposition import Exposition

log = structlog.get_logger(__name__)

DEFAULT_LISTEN: Final = "127.0.0.1:10055"
# Prometheus sends its whole head (~300 bytes) in one packet; nginx allows 4 x 8 KiB, Node 16 KiB.
_HEAD_BYTES: Final = 16 * 1024
_HEAD_SECONDS: Final = 10.0
# A bound on writing the response (a client that stops reading holds its thread that long).
_SEND_SECONDS: Final = 10.0
# A connection costs a thread and at most _HEAD_BYTES of head (~55 KiB measured): 256 of them stay
# under 15 MiB, and far from the 1,024 file descriptors a user service gets by default.
MAX_CONNECTIONS: Final = 256
_ALLOWED: Final = ("GET", "HEAD")
_LANDING: Final = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>provenanced</title></head>
<body><h1>provenanced {version}</h1>
<p>Tracks where each systemd user unit's definition comes from and reports drift.</p>
<ul>
<li><a href="/metrics">/metrics</a> &mdash; Prometheus metrics</li>
<li><a href="/api/v1/findings">/api/v1/findings</a> &mdash; open findings as JSON</li>
<li><a href="/-/healthy">/-/healthy</a> &mdash; liveness</li>
<li><a href="/-/ready">/-/ready</a> &mdash; readiness (first audit done, manager connected)</li>
</ul></body></html>
"""


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """PEM files for HTTPS; with ``client_ca`` every client must present a cert it signed."""

    cert: str
    key: str
    client_ca: str | None = None


@dataclass(frozen=True, slots=True)
class _Response:
    status: HTTPStatus
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()


class HttpServer:
    """A running endpoint: where it listens, and how to stop it."""

    def __init__(self, server: _Server, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread
        host, port = server.socket.getsockname()[:2]
        self._address = (str(host), int(port))

    @property
    def address(self) -> tuple[str, int]:
        """The bound host and port (the real port when asked for port 0); valid after stop()."""
        return self._address

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, close the listening socket and wait for the serving thread."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout)


def start_http_server(
    listen: str,
    registry: CollectorRegistry,
    get_status: Callable[[], DaemonStatus | Mapping[str, DaemonStatus]],
    *,
    tls: TlsFiles | None = None,
    fd: int | None = None,
    stalled_for: Callable[[], float] | None = None,
    version: Callable[[], int] | None = None,
) -> HttpServer:
    """Serve on ``listen`` ("host:port", "[v6]:port"), or on the inherited listening socket ``fd``.

    ``stalled_for`` says how long the event loop has been stuck (0.0 when it runs); /-/healthy
    fails while it is not 0. ``version`` moves with every counter of ``registry``: /metrics then
    serves the bytes rendered for the current status and version. Raises ConfigError, one line, when the address cannot be bound or
    the TLS files don't load.
    """
    context = _tls_context(tls) if tls is not None else None
    server = _Server(
        _inherited_socket(fd) if fd is not None else _bound_socket(listen),
        Exposition(registry, get_status, version),
        get_status,
        context,
        stalled_for,
    )
    thread = threading.Thread(target=server.serve_forever, name="http.serve", daemon=True)
    thread.start()
    endpoint = HttpServer(server, thread)
    host, port = endpoint.address
    log.info("http.listening", host=host, port=port, tls=context is not None, inherited=fd)
    return endpoint


def parse_listen(listen: str) -> tuple[str, int]:
    """Split "host:port" or "[ipv6]:port" into host and port."""
    host, sep, port_text = listen.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ConfigError(f"listen address {listen!r}: write an IPv6 host in brackets, [::1]:port")
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise ConfigError(f"listen address {listen!r} is not host:port (e.g. {DEFAULT_LISTEN})")
    return host, int(port_text)


def _bound_socket(listen: str) -> socket.socket:
    host, port = parse_listen(listen)
    try:
        family, _, _, _, sockaddr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {listen}: {_reason(exc)}") from exc
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(64)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {listen}: {_reason(exc)}") from exc
    return sock


def _inherited_socket(fd: int) -> socket.socket:
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ConfigError(f"inherited fd {fd} is not a socket: {_reason(exc)}") from exc
    listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or not listening:
        sock.detach()  # not ours to close: leave the fd to whoever passed it
        raise ConfigError(f"inherited fd {fd} is not a listening TCP socket (ListenStream=port)")
    return sock


def _tls_context(tls: TlsFiles) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(tls.cert, tls.key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"cannot load TLS cert {tls.cert} / key {tls.key}: {_reason(exc)}"
        ) from exc
    if tls.client_ca is not None:
        try:
            context.load_verify_locations(cafile=tls.client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load client CA {tls.client_ca}: {_reason(exc)}") from exc
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


_BUSY: Final = (
    b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: 32\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
    b"busy: too many open connections\n"
)


class _HeadTooLargeError(Exception):
    """The request line and headers went past ``_HEAD_BYTES``."""


class _HungUpError(Exception):
    """The client closed the connection before its request head was complete."""


class _HeadSource(io.RawIOBase):
    """The socket as the request head's source: every read counts against one byte budget and
    waits no later than one deadline (a client trickling bytes cannot stretch it)."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._sock = sock
        self._deadline = deadline
        self._left = _HEAD_BYTES

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        """Read what has arrived, at most the budget left, waiting at most until the deadline.

        A connection closed before its first byte (a port check) is a plain end of file.
        """
        if self._left <= 0:
            raise _HeadTooLargeError(f"request head over {_HEAD_BYTES} bytes")
        wait = self._deadline - time.monotonic()
        if wait <= 0:
            raise TimeoutError(f"request head not complete within {_HEAD_SECONDS:g} s")
        self._sock.settimeout(wait)
        count = self._sock.recv_into(memoryview(buffer)[: self._left])
        if count == 0 and self._left < _HEAD_BYTES:
            raise _HungUpError("connection closed before the end of the request head")
        self._left -= count
        return count


class _Server(ThreadingHTTPServer):
    """A ThreadingHTTPServer over a socket we already hold, at most ``MAX_CONNECTIONS`` at once,
    wrapping TLS in the worker thread."""

    daemon_threads = True

    def __init__(
        self,
        sock: socket.socket,
        exposition: Exposition,
        get_status: Callable[[], DaemonStatus | Mapping[str, DaemonStatus]],
        tls: ssl.SSLContext | None,
        stalled_for: Callable[[], float] | None,
    ) -> None:
        self.address_family = sock.family
        super().__init__(sock.getsockname()[:2], _Handler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock
        self.exposition = exposition
        self.get_status = get_status
        self.tls = tls
        self.stalled_for = stalled_for
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def process_request(self, request: Any, client_address: Any) -> None:
        """Hand the connection to a thread of its own, or refuse it when every slot is taken."""
        if not self._slots.acquire(blocking=False):
            self._refuse(request, client_address)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """Serve the connection, then free its slot."""
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def _refuse(self, request: socket.socket, client_address: Any) -> None:
        """503 and close, never waiting (under TLS just close: no handshake on the accept thread)."""
        log.debug("http.busy", client=client_address[0], limit=MAX_CONNECTIONS)
        request.setblocking(False)
        if self.tls is None:
            with contextlib.suppress(OSError):
                request.recv(_HEAD_BYTES)  # what has arrived, so close() sends FIN, not RST
            with contextlib.suppress(OSError):
                request.send(_BUSY)
        self.shutdown_request(request)

    def finish_request(self, request: Any, client_address: Any) -> None:
        """Do the TLS handshake here, on the worker thread, then handle the request; both count
        against the head's deadline."""
        deadline = time.monotonic() + _HEAD_SECONDS
        if self.tls is None:
            _Handler(request, client_address, self, deadline)
            return
        # CPython bounds the whole handshake by the timeout, not each read of it.
        request.settimeout(_HEAD_SECONDS)
        try:
            conn = self.tls.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            log.info("http.tls_refused", client=client_address[0], error=str(exc))
            return
        try:
            _Handler(conn, client_address, self, deadline)
        finally:
            conn.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Log a request that blew up instead of printing a traceback; the server carries on."""
        log.warning("http.request_failed", client=client_address[0], exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    """Routes GET/HEAD to the endpoints; everything else is 404 or 405."""

    server_version = f"provenanced/{__version__}"
    # A request line without a version (or a garbled one) still gets a status line in the reply.
    default_request_version = "HTTP/1.0"

    def __init__(
        self, request: Any, client_address: Any, server: _Server, deadline: float | None = None
    ) -> None:
        self.deadline = time.monotonic() + _HEAD_SECONDS if deadline is None else deadline
        super().__init__(request, client_address, server)

    def setup(self) -> None:
        """Read the request head through its budget and deadline."""
        super().setup()
        self.rfile = io.BufferedReader(_HeadSource(self.connection, self.deadline))

    def handle_one_request(self) -> None:
        """Read one request within the head's limits and answer it; a client that hangs up or
        runs out of time costs one debug line."""
        self.close_connection = True
        try:
            if not self._read_request_line() or not self.parse_request():
                return
            self.connection.settimeout(_SEND_SECONDS)
            getattr(self, f"do_{self.command}")()
            self.wfile.flush()
        except (_HungUpError, ConnectionError, ssl.SSLError) as exc:
            log.debug("http.client_hung_up", client=self.client_address[0], error=str(exc))
        except TimeoutError as exc:
            log.debug("http.client_too_slow", client=self.client_address[0], error=str(exc))

    def _read_request_line(self) -> bool:
        try:
            self.raw_requestline = self.rfile.readline()
        except _HeadTooLargeError:
            self.requestline = self.request_version = self.command = ""
            self.send_error(HTTPStatus.REQUEST_URI_TOO_LONG)
            return False
        return True

    def parse_request(self) -> bool:
        """Parse within the byte budget (431 past it); refuse methods other than GET and HEAD
        with 405 before any routing."""
        try:
            if not super().parse_request():
                return False
        except _HeadTooLargeError as exc:
            self.send_error(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, explain=str(exc))
            return False
        if self.command in _ALLOWED:
            return True
        self._send(
            _Response(
                HTTPStatus.METHOD_NOT_ALLOWED,
                b"method not allowed\n",
                headers=(("Allow", ", ".join(_ALLOWED)),),
            )
        )
        return False

    def do_GET(self) -> None:
        """Answer a GET."""
        self._send(self._answer())

    def do_HEAD(self) -> None:
        """Answer a HEAD: the GET headers, no body."""
        self._send(self._answer(), body=False)

    def log_message(self, format: str, *args: Any) -> None:
        """Route the stdlib's access and error lines to structlog at debug level."""
        log.debug("http.request", client=self.client_address[0], line=format % args)

    def _answer(self) -> _Response:
        """The route's response, or 500 when building it failed (e.g. get_status raised)."""
        try:
            return self._route()
        except Exception:
            # Whatever get_status or a collector raised, the client gets a 500 and we go on.
            log.exception("http.handler_failed", path=self.path)
            return _Response(HTTPStatus.INTERNAL_SERVER_ERROR, b"internal error; see the log\n")

    def _route(self) -> _Response:
        server = cast(_Server, self.server)
        url = urlsplit(self.path)
        path = url.path
        if path == "/metrics":
            return self._metrics(server.exposition)
        if path == "/-/healthy":
            return _healthy(server.stalled_for)
        if path == "/-/ready":
            return _ready(server.get_status())
        if path == "/api/v1/findings":
            return _findings(server.get_status(), parse_qs(url.query).get("user", [None])[-1])
        if path == "/":
            body = _LANDING.format(version=html.escape(__version__)).encode()
            return _Response(HTTPStatus.OK, body, "text/html; charset=utf-8")
        return _Response(HTTPStatus.NOT_FOUND, b"not found; see / for the endpoints\n")

    def _metrics(self, exposition: Exposition) -> _Response:
        gzipped = gzip_accepted(self.headers.get("Accept-Encoding", ""))
        body, content_type = exposition.render(self.headers.get("Accept", ""), gzipped)
        if gzipped:
            return _Response(HTTPStatus.OK, body, content_type, (("Content-Encoding", "gzip"),))
        return _Response(HTTPStatus.OK, body, content_type)

    def _send(self, response: _Response, *, body: bool = True) -> None:
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        for name, value in response.headers:
            self.send_header(name, value)
        self.end_headers()
        if body:
            self.wfile.write(response.body)


def _healthy(stalled_for: Callable[[], float] | None) -> _Response:
    stalled = stalled_for() if stalled_for is not None else 0.0
    if not stalled:
        return _Response(HTTPStatus.OK, b"provenanced is healthy\n")
    if math.isinf(stalled):
        body = b"unhealthy: the event loop is closed\n"
    else:
        body = f"unhealthy: the event loop has not run for {stalled:.1f} s\n".encode()
    return _Response(HTTPStatus.SERVICE_UNAVAILABLE, body)


def _findings_document(status: DaemonStatus) -> dict[str, Any]:
    return {
        "units": status.units_audited,
        "findings": [finding.to_json() for finding in status.findings],
        "stale": status.behind,
    }


def _ready(got: DaemonStatus | Mapping[str, DaemonStatus]) -> _Response:
    if not isinstance(got, DaemonStatus):
        # Host mode: ready when every followed user's engine is (a host with none is ready).
        waiting = sorted(user for user, s in got.items() if not (s.ready and s.manager_connected))
        if not waiting:
            return _Response(HTTPStatus.OK, b"provenanced is ready\n")
        text = f"not ready: waiting for {', '.join(waiting[:10])}\n"
        return _Response(HTTPStatus.SERVICE_UNAVAILABLE, text.encode("utf-8", "backslashreplace"))
    status = got
    if status.ready and status.manager_connected:
        return _Response(HTTPStatus.OK, b"provenanced is ready\n")
    reason = "first audit not finished" if not status.ready else "user manager not connected"
    return _Response(HTTPStatus.SERVICE_UNAVAILABLE, f"not ready: {reason}\n".encode())


def _findings(got: DaemonStatus | Mapping[str, DaemonStatus], user: str | None) -> _Response:
    document: dict[str, Any]
    if isinstance(got, DaemonStatus):
        document = _findings_document(got)
    elif user is None:
        # Host mode without ?user=: every followed user's document, by name.
        document = {"users": {name: _findings_document(s) for name, s in sorted(got.items())}}
    elif user in got:
        document = {"user": user, **_findings_document(got[user])}
    else:
        return _Response(HTTPStatus.NOT_FOUND, b"no such user is followed\n")
    # ensure_ascii keeps undecodable path bytes (surrogates) encodable as \\u escapes.
    body = json.dumps(document, ensure_ascii=True).encode("ascii")
    return _Response(HTTPStatus.OK, body, "application/json")

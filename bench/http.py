"""A minimal HTTP/1.0 GET, so the client adds as little as possible to a measured scrape."""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass


class HttpError(Exception):
    """A scrape did not return 200."""


@dataclass(frozen=True, slots=True)
class Response:
    """A body, how long the request took end to end, and when its first byte came."""

    status: int
    body: bytes
    seconds: float
    first_byte: float  # perf_counter


def get(host: str, port: int, path: str = "/metrics", timeout: float = 30.0) -> Response:
    """GET one path; the servers measured here (ours, node_exporter) close after the response."""
    started = time.perf_counter()
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: {host}\r\nAccept: text/plain\r\n\r\n".encode())
        chunks = [sock.recv(1 << 16)]
        first_byte = time.perf_counter()
        while data := sock.recv(1 << 16):
            chunks.append(data)
    seconds = time.perf_counter() - started
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    try:
        status = int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        raise HttpError(f"no HTTP status line from {host}:{port}{path}") from None
    return Response(status, body, seconds, first_byte)


def samples(text: str) -> dict[str, float]:
    """Series → value from the text exposition (comments dropped, labels kept verbatim)."""
    result: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        try:
            result[series] = float(value)
        except ValueError:
            continue
    return result


def total(series: dict[str, float], name: str) -> float:
    """The sum of every series of one metric name, whatever its labels."""
    return sum(v for k, v in series.items() if k == name or k.startswith(name + "{"))


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port

"""Shared test helpers: poll for conditions outside the test process instead of sleeping."""

from __future__ import annotations

import ast
import socket
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T],
    timeout: float = 10.0,
    interval: float = 0.05,
    message: str = "",
) -> T:
    """Poll a condition outside the test process and return its first truthy value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            what = message or getattr(predicate, "__name__", repr(predicate))
            raise AssertionError(f"condition not met within {timeout}s: {what} (last: {value!r})")
        time.sleep(interval)


def parse_python(source: str, filename: str = "<unknown>") -> ast.Module:
    """``ast.parse``, immune to CPython 3.11's shared AST depth counter (gh-106905).

    Another thread formatting a traceback (3.11 draws its carets with ``ast``) can make a parse
    here fail with "AST constructor recursion depth mismatch"; the source itself is fine.
    """
    for _ in range(4):
        try:
            return ast.parse(source, filename)
        except SystemError as exc:
            if "recursion depth mismatch" not in str(exc):
                raise
            error = exc
    raise error


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port

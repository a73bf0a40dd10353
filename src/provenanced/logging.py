"""Log configuration: the only place that calls ``structlog.configure`` (it is global state).

Formats: ``console`` for people at a terminal, ``logfmt`` and ``json`` for log shippers, and
``journal``, which sends each event to journald with its keys as native fields so
``journalctl UNIT=foo.service`` or ``-o json`` can filter on them. ``auto`` picks console on a tty,
journal when stderr is the journal stream systemd gave us (``JOURNAL_STREAM``), else logfmt.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from collections.abc import Mapping
from typing import Any, Final, Literal, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger
from systemd import journal

from provenanced.errors import ConfigError

LogFormat = Literal["auto", "console", "logfmt", "json", "journal"]
FORMATS: Final[tuple[LogFormat, ...]] = ("auto", "console", "logfmt", "json", "journal")
LEVELS: Final[Mapping[str, int]] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
# syslog priorities journald expects in PRIORITY=.
JOURNAL_PRIORITIES: Final[Mapping[str, int]] = {
    "debug": 7,
    "info": 6,
    "warning": 4,
    "error": 3,
    "critical": 2,
}
IDENTIFIER: Final = "provenanced"
# Fields this module sets itself; an event key that maps onto one is renamed, not obeyed.
_RESERVED: Final = frozenset({"MESSAGE", "PRIORITY", "SYSLOG_IDENTIFIER", "LEVEL"})
_INVALID_FIELD_CHARS: Final = re.compile(r"[^A-Z0-9_]")


def configure_logging(level: str, fmt: LogFormat = "auto") -> LogFormat:
    """Configure structlog (and route stdlib logging through it); returns the format chosen."""
    if level.lower() not in LEVELS:
        raise ConfigError(f"log level {level!r} is not one of {', '.join(LEVELS)}")
    if fmt not in FORMATS:
        raise ConfigError(f"log format {fmt!r} is not one of {', '.join(FORMATS)}")
    min_level = LEVELS[level.lower()]
    chosen = resolve_format(fmt, sys.stderr, os.environ) if fmt == "auto" else fmt
    structlog.configure(
        processors=_processors(chosen),
        wrapper_class=structlog.make_filtering_bound_logger(min_level),
        logger_factory=_journal_logger_factory if chosen == "journal" else _stderr_logger_factory,
        cache_logger_on_first_use=False,
    )
    _route_stdlib_logging(min_level)
    return chosen


def resolve_format(fmt: LogFormat, stream: TextIO, environ: Mapping[str, str]) -> LogFormat:
    """What ``auto`` means for this stream and environment."""
    if fmt != "auto":
        return fmt
    if stream.isatty():
        return "console"
    if is_journal_stream(stream, environ.get("JOURNAL_STREAM", "")):
        return "journal"
    return "logfmt"


def is_journal_stream(stream: TextIO, journal_stream: str) -> bool:
    """True when ``stream`` is the journal connection named by ``JOURNAL_STREAM`` ("dev:inode")."""
    device, sep, inode = journal_stream.partition(":")
    if not sep or not device.isdigit() or not inode.isdigit():
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError):
        return False
    return (st.st_dev, st.st_ino) == (int(device), int(inode))


def add_journal_priority(_: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """Add the syslog PRIORITY matching the log method's level."""
    level = str(event_dict.get("level", method_name))
    return {**event_dict, "priority": JOURNAL_PRIORITIES.get(level, 6)}


def render_journal_fields(_: WrappedLogger, __: str, event_dict: EventDict) -> dict[str, str]:
    """Turn an event into journald fields: ``event`` → MESSAGE, other keys uppercased."""
    fields = {
        "MESSAGE": str(event_dict.get("event", "")),
        "PRIORITY": str(event_dict.get("priority", 6)),
        "SYSLOG_IDENTIFIER": IDENTIFIER,
    }
    for key, value in event_dict.items():
        if key in ("event", "priority", "level"):
            continue
        fields[journal_field_name(key)] = str(value)
    return fields


def journal_field_name(key: str) -> str:
    """A valid journald field name for an event key: A-Z, 0-9, _, not leading _ or digit."""
    name = _INVALID_FIELD_CHARS.sub("_", key.upper()).lstrip("_0123456789")
    if not name or name in _RESERVED:
        name = f"EVENT_{name}"
    return name[:64]


class _JournalLogger:
    """A structlog logger whose methods take journal fields as keywords and send them."""

    def msg(self, **fields: str) -> None:
        """Send one entry; an unreachable journald loses the line (logging must not raise)."""
        lines = [
            name.encode() + b"=" + value.encode("utf-8", "backslashreplace")
            for name, value in fields.items()
        ]
        # journald is gone: there is nowhere left to report that, and logging must not raise.
        with contextlib.suppress(OSError, ValueError):
            journal.sendv(*lines)

    debug = info = warning = warn = error = critical = exception = fatal = log = msg


def _journal_logger_factory(*_: Any) -> _JournalLogger:
    return _JournalLogger()


def _stderr_logger_factory(*_: Any) -> structlog.WriteLogger:
    # Looked up at call time so a test's or supervisor's replacement of sys.stderr is honoured.
    return structlog.WriteLogger(sys.stderr)


def _processors(fmt: LogFormat) -> list[Processor]:
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.StackInfoRenderer(),
    ]
    if fmt == "journal":
        # journald timestamps each entry itself.
        return [
            *shared,
            structlog.processors.format_exc_info,
            add_journal_priority,
            render_journal_fields,
        ]
    stamped: list[Processor] = [*shared, structlog.processors.TimeStamper(fmt="iso", utc=True)]
    if fmt == "console":
        return [*stamped, structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())]
    if fmt == "json":
        return [*stamped, structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    return [
        *stamped,
        structlog.processors.format_exc_info,
        structlog.processors.LogfmtRenderer(key_order=["timestamp", "level", "event"]),
    ]


class _StructlogHandler(logging.Handler):
    """Forwards stdlib log records (dbus-fast, asyncinotify) into the structlog pipeline."""

    def emit(self, record: logging.LogRecord) -> None:
        """Log the record's message under its logger name at its level."""
        extra: dict[str, Any] = {"exc_info": record.exc_info} if record.exc_info else {}
        structlog.get_logger().log(record.levelno, record.getMessage(), logger=record.name, **extra)


def _route_stdlib_logging(min_level: int) -> None:
    root = logging.getLogger()
    root.handlers = [h for h in root.handlers if not isinstance(h, _StructlogHandler)]
    root.addHandler(_StructlogHandler())
    root.setLevel(min_level)

"""provenanced.logging: format choice, the journal field processors, and the configured output."""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from provenanced.errors import ConfigError
from provenanced.logging import (
    add_journal_priority,
    configure_logging,
    is_journal_stream,
    journal_field_name,
    render_journal_fields,
    resolve_format,
)


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    """configure_logging changes global state; put structlog and the root logger back."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.reset_defaults()
    root.handlers = handlers
    root.setLevel(level)


def _stream_id(path: Path) -> str:
    st = path.stat()
    return f"{st.st_dev}:{st.st_ino}"


class TestResolveFormat:
    @pytest.mark.parametrize("fmt", ["console", "logfmt", "json", "journal"])
    def test_explicit_format_is_kept(self, fmt: Any, tmp_path: Path) -> None:
        """An explicit format is used whatever the stream is."""
        with (tmp_path / "f").open("w") as stream:
            assert resolve_format(fmt, stream, {}) == fmt

    def test_tty_is_console(self) -> None:
        """auto on a terminal renders for people."""
        primary, secondary = os.openpty()
        try:
            with os.fdopen(secondary, "w") as stream:
                assert resolve_format("auto", stream, {}) == "console"
        finally:
            os.close(primary)

    def test_journal_stream_is_journal(self, tmp_path: Path) -> None:
        """auto when stderr is the stream JOURNAL_STREAM names sends native journal fields."""
        path = tmp_path / "stream"
        with path.open("w") as stream:
            env = {"JOURNAL_STREAM": _stream_id(path)}
            assert resolve_format("auto", stream, env) == "journal"

    @pytest.mark.parametrize("journal_stream", ["", "1:2", "garbage", "12:", ":34"])
    def test_anything_else_is_logfmt(self, journal_stream: str, tmp_path: Path) -> None:
        """auto off a tty and off the journal stream (e.g. inherited by a child) is logfmt."""
        with (tmp_path / "f").open("w") as stream:
            assert resolve_format("auto", stream, {"JOURNAL_STREAM": journal_stream}) == "logfmt"

    def test_stream_without_fileno_is_not_the_journal(self) -> None:
        """A stream with no file descriptor can't be the journal stream."""
        assert not is_journal_stream(io.StringIO(), "1:2")


class TestJournalFieldName:
    @pytest.mark.parametrize(
        ("key", "name"),
        [
            ("unit", "UNIT"),
            ("path", "PATH"),
            ("message_id", "MESSAGE_ID"),
            ("dbus.method", "DBUS_METHOD"),
            ("_secret", "SECRET"),
            ("9lives", "LIVES"),
            ("message", "EVENT_MESSAGE"),
            ("priority", "EVENT_PRIORITY"),
            ("syslog_identifier", "EVENT_SYSLOG_IDENTIFIER"),
            ("___", "EVENT_"),
            ("x" * 80, "X" * 64),
        ],
    )
    def test_names(self, key: str, name: str) -> None:
        """Keys become valid field names and can't override MESSAGE, PRIORITY or the identifier."""
        assert journal_field_name(key) == name


class TestJournalProcessors:
    @pytest.mark.parametrize(
        ("level", "priority"),
        [("debug", 7), ("info", 6), ("warning", 4), ("error", 3), ("critical", 2)],
    )
    def test_priority_from_level(self, level: str, priority: int) -> None:
        """The level maps to its syslog priority, and the input dict is left alone."""
        event = {"event": "x", "level": level}
        assert add_journal_priority(None, level, event)["priority"] == priority
        assert "priority" not in event

    def test_render(self) -> None:
        """event becomes MESSAGE, keys are uppercased, values become strings."""
        fields = render_journal_fields(
            None,
            "info",
            {
                "event": "drift.detected",
                "level": "info",
                "priority": 6,
                "unit": "a.service",
                "n": 3,
            },
        )
        assert fields == {
            "MESSAGE": "drift.detected",
            "PRIORITY": "6",
            "SYSLOG_IDENTIFIER": "provenanced",
            "UNIT": "a.service",
            "N": "3",
        }


class TestConfigureLogging:
    def test_logfmt_filters_by_level(self, capsys: pytest.CaptureFixture[str]) -> None:
        """logfmt writes key=value lines on stderr and drops events below the level."""
        assert configure_logging("info", "logfmt") == "logfmt"
        log = structlog.get_logger(__name__)
        log.debug("hidden.event")
        log.info("manager.connected", transport="private")
        err = capsys.readouterr().err
        assert "hidden.event" not in err
        (line,) = err.splitlines()
        assert "level=info event=manager.connected" in line
        assert "transport=private" in line
        assert line.startswith("timestamp=")

    def test_json(self, capsys: pytest.CaptureFixture[str]) -> None:
        """json writes one object per line."""
        configure_logging("debug", "json")
        structlog.get_logger().warning("drift.detected", unit="a.service")
        record = json.loads(capsys.readouterr().err)
        assert record["event"] == "drift.detected"
        assert record["level"] == "warning"
        assert record["unit"] == "a.service"

    def test_console(self, capsys: pytest.CaptureFixture[str]) -> None:
        """console renders the event and its keys for a person."""
        configure_logging("info", "console")
        structlog.get_logger().info("engine.ready", units=3)
        err = capsys.readouterr().err
        assert "engine.ready" in err
        assert "units=3" in err

    def test_bound_context(self, capsys: pytest.CaptureFixture[str]) -> None:
        """Context bound once and contextvars both show up in every line."""
        configure_logging("info", "logfmt")
        with structlog.contextvars.bound_contextvars(resync=4):
            structlog.get_logger().bind(unit="a.service").info("unit.checked")
        err = capsys.readouterr().err
        assert "resync=4" in err
        assert "unit=a.service" in err

    def test_stdlib_records_are_routed(self, capsys: pytest.CaptureFixture[str]) -> None:
        """Library log records (dbus-fast, asyncinotify) come out in the same format."""
        configure_logging("info", "logfmt")
        logging.getLogger("dbus_fast.aio").warning("bus %s gone", "user")
        err = capsys.readouterr().err
        assert "event='bus user gone'" in err or 'event="bus user gone"' in err
        assert "logger=dbus_fast.aio" in err

    def test_reconfiguring_does_not_duplicate_stdlib_lines(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Calling configure_logging twice keeps one stdlib bridge."""
        configure_logging("info", "logfmt")
        configure_logging("info", "logfmt")
        logging.getLogger("x").warning("once")
        assert len(capsys.readouterr().err.splitlines()) == 1

    @pytest.mark.parametrize(("level", "fmt"), [("verbose", "logfmt"), ("info", "xml")])
    def test_bad_values_are_config_errors(self, level: str, fmt: Any) -> None:
        """An unknown level or format is a ConfigError naming it."""
        with pytest.raises(ConfigError, match=r"verbose|xml"):
            configure_logging(level, fmt)

"""The one exception hierarchy; each error carries the exit code the CLI uses for it."""

from typing import ClassVar


class ProvenancedError(Exception):
    """Base of every error the CLI turns into one stderr line and an exit code."""

    exit_code: ClassVar[int] = 1


class UsageError(ProvenancedError):
    """The command line or its arguments are wrong."""

    exit_code = 2


class ConfigError(ProvenancedError):
    """The configuration file or environment is invalid."""

    exit_code = 2


class ManagerUnreachableError(ProvenancedError):
    """The user manager cannot be reached on any transport."""

    exit_code = 3


class ManagerCallError(ProvenancedError):
    """A D-Bus call to the manager failed or timed out."""

    exit_code = 3

    def __init__(self, message: str, error_name: str = "", reply: str = "") -> None:
        super().__init__(message)
        self.error_name = error_name
        self.reply = reply  # the manager's own words, when it answered with an error


class StateError(ProvenancedError):
    """The state directory (baseline, quarantine) cannot be read or written."""

    exit_code = 2


def one_line(text: str, limit: int | None = None) -> str:
    """``text`` fit for an error line: control characters escaped, cut after ``limit`` characters."""
    cut = text if limit is None or len(text) <= limit else text[:limit] + "…"
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in cut)

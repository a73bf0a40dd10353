"""A real, throw-away `systemd --user` manager plus a fake Home Manager store, for tests and demo.

Synchronous on purpose: pytest fixtures and `provenanced demo` both drive it without a loop.
"""

from provenanced.sandbox._proc import (
    BOOTED_MARKER,
    JOURNAL_SOCKET,
    JOURNALD_BINARY,
    SANDBOX_MARKER,
    SYSTEM_PATH,
    SYSTEMD_BINARY,
    SandboxError,
)
from provenanced.sandbox.accounts import Account
from provenanced.sandbox.homemanager import Generation, activate, build_generation, example_units
from provenanced.sandbox.host import HostSandbox, UserSandbox
from provenanced.sandbox.journald import Journald, ensure_journald, journald_listening
from provenanced.sandbox.manager import Sandbox, boot

__all__ = [
    "BOOTED_MARKER",
    "JOURNALD_BINARY",
    "JOURNAL_SOCKET",
    "SANDBOX_MARKER",
    "SYSTEMD_BINARY",
    "SYSTEM_PATH",
    "Account",
    "Generation",
    "HostSandbox",
    "Journald",
    "Sandbox",
    "SandboxError",
    "UserSandbox",
    "activate",
    "boot",
    "build_generation",
    "ensure_journald",
    "example_units",
    "journald_listening",
]

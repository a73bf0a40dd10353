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
from provenanced.sandbox.fsops import Op, OpLog
from provenanced.sandbox.hmactivation import Options, activate, switch
from provenanced.sandbox.hmforms import (
    FORMS,
    Form,
    auto_upgrade_units,
    prepare_switch,
    run_switch,
)
from provenanced.sandbox.hmstore import (
    RELEASES,
    Generation,
    Release,
    build_generation,
    example_switch,
    example_units,
)
from provenanced.sandbox.host import HostSandbox, UserSandbox
from provenanced.sandbox.journald import Journald, ensure_journald, journald_listening, read_journal
from provenanced.sandbox.usermanager import Sandbox, boot

__all__ = [
    "BOOTED_MARKER",
    "FORMS",
    "JOURNALD_BINARY",
    "JOURNAL_SOCKET",
    "RELEASES",
    "SANDBOX_MARKER",
    "SYSTEMD_BINARY",
    "SYSTEM_PATH",
    "Account",
    "Form",
    "Generation",
    "HostSandbox",
    "Journald",
    "Op",
    "OpLog",
    "Options",
    "Release",
    "Sandbox",
    "SandboxError",
    "UserSandbox",
    "activate",
    "auto_upgrade_units",
    "boot",
    "build_generation",
    "ensure_journald",
    "example_switch",
    "example_units",
    "journald_listening",
    "prepare_switch",
    "read_journal",
    "run_switch",
    "switch",
]

"""Fixtures on the real sandboxed user manager and journald, and the CI guard for real parts."""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from provenanced.sandbox import (
    BOOTED_MARKER,
    JOURNALD_BINARY,
    SYSTEM_PATH,
    SYSTEMD_BINARY,
    HostSandbox,
    Journald,
    Sandbox,
    ensure_journald,
    journald_listening,
)

_MANAGER_MARKERS = frozenset({"integration", "fault", "e2e"})
_E2E_MARKERS = frozenset({"e2e"})
_HOST_MARKERS = frozenset({"host"})
_DPKG_MARKERS = frozenset({"dpkg"})
_FUSE_MARKERS = frozenset({"fuse"})
_DBUS_SOCKET_UNITS = ("/usr/lib/systemd/user/dbus.socket", "/lib/systemd/user/dbus.socket")


@dataclass(frozen=True)
class _Part:
    """A real component some tests need; in CI its absence fails the run instead of skipping."""

    name: str
    available: Callable[[], bool]
    needed_by: frozenset[str]


def _journald_usable() -> bool:
    """journald is usable when one listens already or we are root and can start one."""
    if journald_listening():
        return True
    return os.geteuid() == 0 and os.access(JOURNALD_BINARY, os.X_OK)


def _can_create_accounts() -> bool:
    """Real accounts need root and the passwd tools; their managers need setpriv."""
    tools = ("useradd", "userdel", "setpriv")
    return os.geteuid() == 0 and all(shutil.which(t, path=SYSTEM_PATH) for t in tools)


_PARTS = (
    _Part(
        f"systemd ({SYSTEMD_BINARY})", lambda: os.access(SYSTEMD_BINARY, os.X_OK), _MANAGER_MARKERS
    ),
    _Part("systemctl on PATH", lambda: shutil.which("systemctl") is not None, _MANAGER_MARKERS),
    _Part(
        f"{BOOTED_MARKER}/ (create it once as root)",
        lambda: BOOTED_MARKER.is_dir() or os.geteuid() == 0,
        _MANAGER_MARKERS,
    ),
    _Part(
        "the user bus (dbus-user-session's dbus.socket)",
        lambda: any(os.path.exists(p) for p in _DBUS_SOCKET_UNITS),
        _MANAGER_MARKERS,
    ),
    _Part(f"systemd-journald ({JOURNALD_BINARY}, run as root)", _journald_usable, _MANAGER_MARKERS),
    _Part("journalctl on PATH", lambda: shutil.which("journalctl") is not None, _MANAGER_MARKERS),
    _Part("root with useradd, userdel and setpriv", _can_create_accounts, _HOST_MARKERS),
    _Part(
        "dpkg and dpkg-deb on PATH, as root (dpkg --root installs owned by root)",
        lambda: bool(shutil.which("dpkg") and shutil.which("dpkg-deb")) and os.geteuid() == 0,
        _DPKG_MARKERS,
    ),
    _Part(
        "FUSE: /dev/fuse, fusermount3 (Debian: fuse3) and mfusepy, as root",
        lambda: (
            os.path.exists("/dev/fuse")
            and shutil.which("fusermount3") is not None
            and importlib.util.find_spec("mfusepy") is not None
            and os.geteuid() == 0
        ),
        _FUSE_MARKERS,
    ),
    _Part(
        "promtool on PATH (Debian: prometheus)",
        lambda: shutil.which("promtool") is not None,
        _E2E_MARKERS,
    ),
    _Part(
        "prometheus on PATH (Debian: prometheus)",
        lambda: shutil.which("prometheus") is not None,
        _E2E_MARKERS,
    ),
)


def _in_ci() -> bool:
    """CI is on when the conventional CI variable holds anything but an explicit no."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _missing_parts() -> list[_Part]:
    """The real parts this machine lacks."""
    return [part for part in _PARTS if not part.available()]


def pytest_sessionstart(session: pytest.Session) -> None:
    """In CI a missing real part is a failure of the run, never a quiet skip."""
    missing = _missing_parts()
    if _in_ci() and missing:
        names = ", ".join(part.name for part in missing)
        pytest.exit(f"CI is set but real test parts are missing: {names}", returncode=3)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Locally, skip marked tests whose real parts are missing and say which ones."""
    missing = _missing_parts()
    if not missing:
        return
    for item in items:
        markers = {mark.name for mark in item.iter_markers()}
        lacking = [part.name for part in missing if part.needed_by & markers]
        if lacking:
            item.add_marker(pytest.mark.skip(reason=f"missing real part: {', '.join(lacking)}"))


@pytest.fixture(scope="session")
def journald() -> Iterator[Journald | None]:
    """One journald for the session: reuse a running one, else start and later stop our own."""
    handle = ensure_journald()
    yield handle
    if handle is not None:
        handle.stop()


def _booted_with_home_manager() -> Iterator[Sandbox]:
    """A manager booted over the example Home Manager tree, so default.target pulls its units."""
    sandbox = Sandbox()
    try:
        sandbox.install_home_manager()
        sandbox.start()
        yield sandbox
    finally:
        sandbox.stop()


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    """One real user manager per test module; tests must leave it as they found it."""
    yield from _booted_with_home_manager()


@pytest.fixture
def fresh_sandbox() -> Iterator[Sandbox]:
    """A user manager of its own for a test that changes or breaks it."""
    yield from _booted_with_home_manager()


@pytest.fixture(scope="module")
def host_sandbox() -> Iterator[HostSandbox]:
    """One root for real accounts per test module; each test adds the users it needs."""
    host = HostSandbox()
    try:
        yield host
    finally:
        host.stop()

"""Shared tools for host-mode tests: a user's edits, settings over a HostSandbox, the host daemon."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

from daemonkit import WAIT, DaemonProcess, daemon_process, eventually, poll
from provenanced.config import Settings
from provenanced.daemon.host import HostDaemon
from provenanced.model import FindingKind
from provenanced.sandbox import HostSandbox, UserSandbox

UNIT = "podman-web.service"
EDITED = "[Service]\nExecStart=/bin/sleep 60\n"


def replace_link(user: UserSandbox) -> Path:
    """The user saves an edited copy over their managed unit link, in one rename (divergent)."""
    path = user.config_dir / UNIT
    tmp = path.with_name(f".{UNIT}.{secrets.token_hex(4)}")
    tmp.write_text(EDITED)
    os.chown(tmp, user.account.uid, user.account.gid)
    os.replace(tmp, path)
    return path


def restore_link(user: UserSandbox, target: str) -> Path:
    """The managed link put back, the user's own, in one rename as Home Manager's `ln` does."""
    path = user.config_dir / UNIT
    tmp = path.with_name(f".{UNIT}.{secrets.token_hex(4)}")
    tmp.symlink_to(target)
    os.chown(tmp, user.account.uid, user.account.gid, follow_symlinks=False)
    os.replace(tmp, path)
    return path


def host_settings(
    host: HostSandbox, state_root: Path, users: list[UserSandbox], **policy: object
) -> Settings:
    """Settings for an in-process host daemon following just ``users``, on any free port."""
    return Settings(
        scope="host",
        host={
            "runtime_root": str(host.runtime_root),
            "state_root": str(state_root),
            "allow_users": [u.account.name for u in users],
        },
        metrics={"listen": "127.0.0.1:0"},
        policy={"quiet_window": 0.2, "alert_min_interval": 0, **policy},
        log={"format": "logfmt", "level": "warning"},
    )


@contextlib.asynccontextmanager
async def running_host(
    settings: Settings,
    load: Callable[[], Settings] | None = None,
    hup: asyncio.Event | None = None,
) -> AsyncIterator[HostDaemon]:
    """The host daemon on the test's loop, past its first discovery; stopped (bounded) after.

    ``load`` re-reads the configuration when ``hup`` is set, as SIGHUP does.
    """
    daemon = HostDaemon(settings, load=load)
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop, hup), name="test.host")
    try:
        await eventually(lambda: daemon.discovered.is_set() or task.done(), WAIT, "discovery")
        if task.done():
            task.result()
        yield daemon
    finally:
        stop.set()
        async with asyncio.timeout(30):
            await task


def user_ready(daemon: HostDaemon, user: UserSandbox) -> bool:
    """The user's engine exists and has published its first full audit."""
    engine = daemon.engine(user.account.name)
    return engine is not None and engine.status.ready


def user_has(daemon: HostDaemon, user: UserSandbox, kind: FindingKind, path: Path) -> bool:
    """The user's published findings hold one of ``kind`` on ``path``."""
    engine = daemon.engine(user.account.name)
    findings = engine.status.findings if engine else ()
    return any(f.kind is kind and f.path == str(path) for f in findings)


@contextlib.contextmanager
def host_process(
    host: HostSandbox, workdir: Path, users: list[UserSandbox]
) -> Iterator[DaemonProcess]:
    """``provenanced run --host`` as a real process following just ``users``, past their first
    audit: a stalled event loop shows where it would in production (/-/healthy, stopping)."""
    names = ", ".join(json.dumps(u.account.name) for u in users)
    config = "\n".join(
        [
            "[host]",
            f"runtime_root = {json.dumps(str(host.runtime_root))}",
            f"state_root = {json.dumps(str(workdir / 'state'))}",
            f"allow_users = [{names}]",
            "[metrics]",
            'listen = "127.0.0.1:0"',
            "[policy]",
            "quiet_window = 0.2",
            "alert_min_interval = 0",
            "[log]",
            'format = "logfmt"',
            'level = "info"',
            "",
        ]
    )
    with daemon_process(host, workdir, config, args=["--host"]) as daemon:
        for user in users:
            poll(
                lambda user=user: daemon.metric("provenanced_ready", user=user.account.name),
                message=f"{user.account.name}'s first audit",
            )
        yield daemon


def process_user_has(daemon: DaemonProcess, user: UserSandbox, path: Path) -> bool:
    """The daemon process's findings API lists one of the user's findings on ``path``."""
    status, body = daemon.get(f"/api/v1/findings?user={user.account.name}")
    return status == 200 and any(f["path"] == str(path) for f in json.loads(body)["findings"])

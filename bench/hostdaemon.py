"""The host daemon at scale, by hand (root): USERS real managers x UNITS units, one process.

`python -m bench.hostdaemon [USERS] [UNITS] [CHANGES]` boots USERS accounts (default 20), each
with UNITS Home Manager services (default 200), runs the host daemon in this process, and
reports its memory and the median of idle /metrics scrapes once every user's first audit is
done, then CHANGES edits (default 100, spread over the users) timed from the write to the finding
in that user's published status.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

from bench.hostusers import _memory_kib, _units
from bench.http import get
from bench.stats import median, ms, percentile
from provenanced.config import Settings
from provenanced.daemon.host import HostDaemon
from provenanced.model import Finding, FindingKind
from provenanced.sandbox import HostSandbox, UserSandbox


def _edit(user: UserSandbox, index: int) -> str:
    path = user.config_dir / f"bench-{index:04d}.service"
    path.unlink()
    path.write_text(f"[Service]\nExecStart=/bin/true {index}\n")
    os.chown(path, user.account.uid, user.account.gid)
    return str(path)


_SCRAPES = 50


def _scrapes(address: tuple[str, int]) -> tuple[list[float], int]:
    """Seconds of each idle scrape after a first one (it may render); the body's size."""
    get(*address)
    replies = [get(*address) for _ in range(_SCRAPES)]
    assert all(r.status == 200 for r in replies)
    return [r.seconds for r in replies], len(replies[-1].body)


def _found(findings: tuple[Finding, ...], path: str) -> bool:
    return any(f.kind is FindingKind.LINK_REPLACED and f.path == path for f in findings)


async def _run(host: HostSandbox, users: list[UserSandbox], changes: int, state: Path) -> None:
    settings = Settings(
        scope="host",
        host={"runtime_root": str(host.runtime_root), "state_root": str(state)},
        metrics={"listen": "127.0.0.1:0"},
        log={"format": "logfmt", "level": "warning"},
    )
    before = _memory_kib()
    daemon = HostDaemon(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    start = time.monotonic()
    names = [u.account.name for u in users]
    # Polls the published status, as a scraper would see it; nothing else to wait on.
    while not all((e := daemon.engine(n)) is not None and e.status.ready for n in names):  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    ready = time.monotonic() - start
    after = _memory_kib()
    assert daemon.http is not None
    scrapes, size = await asyncio.to_thread(_scrapes, daemon.http.address)
    latencies = []
    for i in range(changes):
        user = users[i % len(users)]
        engine = daemon.engine(user.account.name)
        assert engine is not None
        path = _edit(user, i // len(users))
        written = time.monotonic()
        while not _found(engine.status.findings, path):  # noqa: ASYNC110 - see above
            await asyncio.sleep(0.002)
        latencies.append(time.monotonic() - written)
    final = _memory_kib()
    stop.set()
    await task
    print(f"every user's first audit done in {ready:.1f} s")
    print(
        f"daemon memory, all ready: RSS +{(after[0] - before[0]) / 1024:.1f} MiB over the "
        f"process before it ({after[0] / 1024:.1f} MiB in all); after the edits "
        f"{final[0] / 1024:.1f} MiB in all"
    )
    print(
        f"{_SCRAPES} idle /metrics scrapes ({size} bytes): median {ms(median(scrapes))}, "
        f"p99 {ms(percentile(scrapes, 99))}"
    )
    print(
        f"{changes} edits: write -> finding median {ms(median(latencies))}, "
        f"p99 {ms(percentile(latencies, 99))}, max {ms(max(latencies))}"
    )


def main() -> int:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    units = int(sys.argv[2]) if len(sys.argv) > 2 else 200
    changes = int(sys.argv[3]) if len(sys.argv) > 3 else 100
    with HostSandbox() as host, tempfile.TemporaryDirectory() as state:
        users = [host.add_user(_units(units)) for _ in range(count)]
        print(f"{count} users x {units} units booted")
        asyncio.run(_run(host, users, changes, Path(state)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

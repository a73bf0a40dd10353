"""What the package database adds to a full resync, timed in-process at the reference tree size.

``python -m bench.packages [--size N]`` boots a sandbox with the bench tree (the host's
/usr/lib/systemd/user is in its search path, as on any Debian), then times
``Observer.observe()``: without a package database; with this machine's dpkg database
unchanged (every full resync pays this); and after one package's info files and ``status``
were rewritten (the resync at the end of a dpkg run pays this). The database is a copy of
/var/lib/dpkg in a temporary directory, so the host's is only read. Nothing here is imported by
the daemon.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench.stats import median, ms
from bench.tree import generate
from provenanced.daemon.observer import Observer, user_dirs
from provenanced.expect.packages import Dpkg
from provenanced.sandbox import Sandbox
from provenanced.systemd.bus import ManagerConnection, resolve_address

_REPEATS = 7
# A package whose files the vendor directory holds, rewritten as an upgrade of it would.
_UPGRADED = "systemd"


def copy_database(source: Path, into: Path) -> Path:
    """The files of a dpkg admin directory the index reads, copied: ``info``, ``status``, ``diversions``."""
    admin = into / "var/lib/dpkg"
    shutil.copytree(source / "info", admin / "info", symlinks=True)
    (admin / "updates").mkdir()
    for name in ("status", "diversions"):
        if (source / name).exists():
            shutil.copy2(source / name, admin / name)
    return admin


def rewrite(path: Path) -> None:
    """Replace a file by rename with the same content, as dpkg replaces its info files."""
    fresh = path.with_name(path.name + "-new")
    fresh.write_bytes(path.read_bytes())
    os.rename(fresh, path)


def upgrade(admin: Path) -> None:
    """What one upgrade of ``_UPGRADED`` leaves in the database: new .list, md5sums, status."""
    for suffix in (".list", ".md5sums"):
        rewrite(admin / "info" / f"{_UPGRADED}{suffix}")
    rewrite(admin / "status")


async def _times(
    fn: Callable[[], Awaitable[Any]], before: Callable[[], None] | None = None
) -> list[float]:
    times = []
    for _ in range(_REPEATS):
        if before is not None:
            before()
        started = time.perf_counter()
        await fn()
        times.append(time.perf_counter() - started)
    return times


def _sync_times(fn: Callable[[], Any], before: Callable[[], None] | None = None) -> list[float]:
    times = []
    for _ in range(_REPEATS):
        if before is not None:
            before()
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return times


def _row(name: str, times: list[float], note: str = "") -> str:
    return f"| {name} | {ms(median(times))} ({ms(min(times))}-{ms(max(times))}) | {note} |"


async def measure(sandbox: Sandbox, admin: Path) -> list[str]:
    """The table rows: each stage's median (min-max) of ``_REPEATS``."""
    env = sandbox.env
    conn = await ManagerConnection.connect(resolve_address(None, env))
    try:
        roots = (str(sandbox.store),)
        plain = Observer(conn, user_dirs(env), roots)
        await plain.observe()
        without = await _times(plain.observe)
        dpkg = Dpkg("/", admindir=str(admin))
        packaged = Observer(conn, user_dirs(env), roots, packages=dpkg)
        obs, _ = await packaged.observe()  # the first read: index, facts and MD5s
        index = packaged.package_index
        assert index is not None
        unchanged = await _times(packaged.observe)
        changed = await _times(packaged.observe, before=lambda: upgrade(admin))
        dirs = sorted(index.dirs)
        cold = _sync_times(lambda: Dpkg("/", admindir=str(admin)).index(dirs))
        warm = _sync_times(lambda: dpkg.index(dirs), before=lambda: upgrade(admin))
        stamp = _sync_times(dpkg.stamp)
        busy = _sync_times(dpkg.busy)
        lists = sum(1 for name in os.listdir(admin / "info") if name.endswith(".list"))
        vendor = sum(1 for path in obs.scanned_files if path.startswith(tuple(index.dirs)))
    finally:
        await conn.close()
    return [
        f"| package index, N = {len(obs.units):,} units, {lists} packages | median (min-max) "
        f"of {_REPEATS} | note |",
        "|---|---|---|",
        _row("observe(): no package database", without),
        _row(
            "observe(): dpkg database unchanged",
            unchanged,
            f"a stamp of 3 stats, {vendor} more vendor files (facts, cached MD5s)",
        ),
        _row(
            f"observe(): after an upgrade of `{_UPGRADED}`",
            changed,
            "re-index: stat every .list, re-read the changed ones and status",
        ),
        _row("index alone, first read", cold, f"{len(index.files)} files indexed"),
        _row("index alone, after an upgrade", warm),
        _row("stamp()", stamp),
        _row("busy()", busy),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.packages", description=__doc__)
    parser.add_argument("--size", type=int, default=1000, help="units in the bench tree")
    parser.add_argument("--admindir", type=Path, default=Path("/var/lib/dpkg"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="provenanced-bench-dpkg-") as tmp:
        admin = copy_database(args.admindir, Path(tmp))
        sandbox = Sandbox(timeout=120.0)
        try:
            generate(sandbox, args.size)
            sandbox.start()
            rows = asyncio.run(measure(sandbox, admin))
        finally:
            sandbox.stop()
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

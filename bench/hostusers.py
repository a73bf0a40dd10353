"""Host-mode foundations, by hand (root): real users' managers and the per-user reader thread.

`python -m bench.hostusers [USERS] [UNITS]` boots USERS real accounts (default 20), each with a
Home Manager tree of UNITS services (default 200), then measures the threads acting as each user:
start time, this process's memory growth per user, and the facts of every unit file read on a
user's thread against FactReader on the calling thread.
"""

from __future__ import annotations

import asyncio
import sys
import time

from bench.proc import sample
from bench.stats import median, ms, percentile
from provenanced.fs.facts import FactReader, scan_unit_dir
from provenanced.fs.fsuid import Credentials, UserThread
from provenanced.sandbox import HostSandbox, UserSandbox

_THREAD_STARTS = 10
_READS = 7
_SINGLE = 100


def _units(count: int) -> dict[str, str]:
    return {
        f".config/systemd/user/bench-{i:04d}.service": (
            f"[Unit]\nDescription=bench unit {i}\n[Service]\nExecStart=/bin/true\n"
        )
        for i in range(count)
    }


def _boot(host: HostSandbox, users: int, units: int) -> list[UserSandbox]:
    booted, times = [], []
    for _ in range(users):
        start = time.monotonic()
        booted.append(host.add_user(_units(units)))
        times.append(time.monotonic() - start)
    managers = [sample(u.manager_pid) for u in booted]
    print(
        f"{users} users x {units} units: add_user (useradd, tree, boot) median {ms(median(times))}"
    )
    print(
        f"  total {sum(times):.1f} s; manager RSS median {median([m.rss_bytes for m in managers]) / 2**20:.1f} MiB"
    )
    return booted


def _memory_kib() -> tuple[int, int]:
    """(RSS, PSS) of this process in KiB."""
    fields = {}
    with open("/proc/self/smaps_rollup", encoding="ascii") as rollup:
        for line in rollup:
            name, _, rest = line.partition(":")
            if rest.strip().endswith("kB"):
                fields[name] = int(rest.split()[0])
    return fields["Rss"], fields["Pss"]


async def _threads(users: list[UserSandbox]) -> None:
    creds = Credentials.of_uid(users[0].account.uid)
    starts = []
    for _ in range(_THREAD_STARTS):
        start = time.monotonic()
        thread = await UserThread.start(creds)
        starts.append(time.monotonic() - start)
        thread.close()
    before = _memory_kib()
    threads = [await UserThread.start(Credentials.of_uid(u.account.uid)) for u in users]
    for thread, user in zip(threads, users, strict=True):
        await thread.facts(scan_unit_dir(str(user.config_dir)))
    after = _memory_kib()
    rss, pss = (a - b for a, b in zip(after, before, strict=True))
    thread, user = threads[0], users[0]
    paths = list(scan_unit_dir(str(user.config_dir)))
    through, direct = [], []
    reader = FactReader()
    for _ in range(_READS):
        start = time.monotonic()
        await thread.facts(paths)
        through.append(time.monotonic() - start)
        start = time.monotonic()
        reader.read_many(paths)
        direct.append(time.monotonic() - start)
    single = []
    for path in paths[:_SINGLE]:
        start = time.monotonic()
        await thread.facts([path])
        single.append(time.monotonic() - start)
    for thread in threads:
        thread.close()
    print(f"thread start median {ms(median(starts))} ({_THREAD_STARTS} starts)")
    print(
        f"{len(users)} user threads, each having read its tree: RSS +{rss / 1024:.2f} MiB "
        f"({rss / len(users):.0f} KiB per user), PSS +{pss / 1024:.2f} MiB"
    )
    print(
        f"facts of {len(paths)} paths: on the user's thread first {ms(through[0])}, then median "
        f"{ms(median(through[1:]))}; FactReader on this thread first {ms(direct[0])}, then median "
        f"{ms(median(direct[1:]))}"
    )
    print(
        f"one path on the user's thread: median {ms(median(single))}, "
        f"p99 {ms(percentile(single, 99))}"
    )


def main() -> int:
    users = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    units = int(sys.argv[2]) if len(sys.argv) > 2 else 200
    with HostSandbox() as host:
        booted = _boot(host, users, units)
        asyncio.run(_threads(booted))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

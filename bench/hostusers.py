"""Host-mode foundations, by hand (root): real users' managers and the per-user file helper.

`python -m bench.hostusers [USERS] [UNITS]` boots USERS real accounts (default 20), each with a
Home Manager tree of UNITS services (default 200), then measures one user's file helper: start
time, memory, and the facts of every unit file read through it against FactReader in process.
"""

from __future__ import annotations

import asyncio
import sys
import time

from bench.proc import sample
from bench.stats import median, ms, percentile
from provenanced.fs.asuser import Credentials, UserHelper
from provenanced.fs.facts import FactReader, scan_unit_dir
from provenanced.sandbox import HostSandbox, UserSandbox

_HELPER_STARTS = 10
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


async def _helper(user: UserSandbox) -> None:
    creds = Credentials.of_uid(user.account.uid)
    starts = []
    for _ in range(_HELPER_STARTS):
        start = time.monotonic()
        helper = await UserHelper.start(creds)
        starts.append(time.monotonic() - start)
        await helper.close()
    helper = await UserHelper.start(creds)
    paths = list(scan_unit_dir(str(user.config_dir)))
    through, direct = [], []
    reader = FactReader()
    for _ in range(_READS):
        start = time.monotonic()
        await helper.facts(paths)
        through.append(time.monotonic() - start)
        start = time.monotonic()
        reader.read_many(paths)
        direct.append(time.monotonic() - start)
    single = []
    for path in paths[:_SINGLE]:
        start = time.monotonic()
        await helper.facts([path])
        single.append(time.monotonic() - start)
    memory = sample(helper.pid)
    await helper.close()
    print(f"helper start median {ms(median(starts))} ({_HELPER_STARTS} starts)")
    print(f"helper RSS {memory.rss_bytes / 2**20:.1f} MiB, PSS {memory.pss_bytes / 2**20:.1f} MiB")
    print(
        f"facts of {len(paths)} paths: through the helper first {ms(through[0])}, then median "
        f"{ms(median(through[1:]))}; FactReader in process first {ms(direct[0])}, then median "
        f"{ms(median(direct[1:]))}"
    )
    print(
        f"one path through the helper: median {ms(median(single))}, p99 {ms(percentile(single, 99))}"
    )


def main() -> int:
    users = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    units = int(sys.argv[2]) if len(sys.argv) > 2 else 200
    with HostSandbox() as host:
        booted = _boot(host, users, units)
        asyncio.run(_helper(booted[0]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

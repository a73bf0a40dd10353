"""A user's runtime dir that never answers stalls neither discovery nor anyone else's detection.

A user owns ``/run/user/<uid>`` and may mount a FUSE file system there (fusermount3 mounts on
a directory the user owns). A real hung mount (tests/hungfs.py) over Alice's ``systemd``
directory hides her manager's socket behind calls that never return; the daemon runs as a real
process, so a stalled event loop shows where it would in production: /-/healthy and Bob.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from daemonkit import poll
from hostkit import host_process, process_user_has, replace_link
from hungfs import HungFs
from provenanced.daemon.discovery import _on_fuse
from provenanced.sandbox import HostSandbox

pytestmark = [pytest.mark.fault, pytest.mark.fuse, pytest.mark.host]

HUNG_UID = 59999  # a runtime dir's name; no account needed: the look hangs before asking


def _stuck_lines(log: str, uid: int) -> list[str]:
    return [
        line
        for line in log.splitlines()
        if "event=host.runtime_dir_stuck" in line and f"uid={uid} " in f"{line} "
    ]


class TestHostHungRuntimeDir:
    def test_a_hung_runtime_dir_is_set_aside_and_seen_again_once_it_answers(
        self, host_sandbox: HostSandbox, tmp_path: Path
    ) -> None:
        """Alice's runtime dir hangs: the look into it is given up (logged once), Bob's drift is
        still seen and the loop answers; once the mount is gone her drift is seen as before."""
        alice, bob = host_sandbox.add_user(), host_sandbox.add_user()
        with host_process(host_sandbox, tmp_path, [alice, bob]) as daemon:
            with HungFs(alice.runtime_dir / "systemd") as mount:
                mount.wait_held()  # Alice's engine looks at her runtime units there first
                # A rescan now (any change in the runtime root): it looks for her socket there.
                (host_sandbox.runtime_root / "rescan").mkdir()
                edited = replace_link(bob)
                poll(
                    lambda: process_user_has(daemon, bob, edited),
                    message="Bob's drift while Alice's runtime dir hangs",
                )
                assert daemon.get("/-/healthy")[0] == 200
                poll(
                    lambda: _stuck_lines(daemon.log(), alice.account.uid),
                    message="Alice's runtime dir set aside",
                )
                # One thread stuck for her at most: no second look while the first hangs.
                assert len(_stuck_lines(daemon.log(), alice.account.uid)) == 1
            # Released and unmounted: her socket is there again, and so is her detection.
            changed = replace_link(alice)
            poll(
                lambda: process_user_has(daemon, alice, changed),
                message="Alice's drift once her runtime dir answers",
            )

    def test_a_runtime_dir_hung_from_the_start_holds_no_one_else_up(
        self, host_sandbox: HostSandbox, tmp_path: Path
    ) -> None:
        """A uid's whole runtime dir is a hung mount before the daemon starts: Bob is followed,
        his drift seen, the loop answers, and that uid is set aside."""
        bob = host_sandbox.add_user()
        with (
            HungFs(host_sandbox.runtime_root / str(HUNG_UID)) as mount,
            host_process(host_sandbox, tmp_path, [bob]) as daemon,
        ):
            try:
                edited = replace_link(bob)
                poll(
                    lambda: process_user_has(daemon, bob, edited),
                    message="Bob's drift while another runtime dir hangs",
                )
                assert daemon.get("/-/healthy")[0] == 200
                poll(
                    lambda: _stuck_lines(daemon.log(), HUNG_UID),
                    message="the hung runtime dir set aside",
                )
            finally:
                mount.release()  # the thread held there returns; the daemon stops as usual


class TestSocketOnFuse:
    def test_what_lives_on_fuse_is_told_from_proc(self, tmp_path: Path) -> None:
        """A FUSE server could answer the probe, then hang the connect's permission check on the
        loop: a descriptor on FUSE is refused, told from /proc without asking the server."""
        with HungFs(tmp_path / "mnt") as mount:
            mount.release()
            on_fuse = os.open(mount.mountpoint, os.O_PATH | os.O_CLOEXEC)
            local = os.open(tmp_path, os.O_PATH | os.O_CLOEXEC)
            try:
                assert _on_fuse(on_fuse)
                assert not _on_fuse(local)
            finally:
                os.close(on_fuse)
                os.close(local)

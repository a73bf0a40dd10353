"""A file system that hangs in one user's tree (a dead sshfs or NFS mount) stalls only that user.

A real FUSE mount (tests/hungfs.py) holds every call until released. One user's unit link and
Home Manager profile lead into it; the daemon runs as a real process, so a stalled event loop
shows where it would in production: /-/healthy, other users' detection, and stopping.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from daemonkit import WAIT, DaemonProcess, config_toml, daemon_process, poll
from hostkit import host_process, process_user_has, replace_link
from hungfs import HungFs
from provenanced.daemon.activation import PROFILE
from provenanced.sandbox import HostSandbox, Sandbox, UserSandbox

pytestmark = [pytest.mark.fault, pytest.mark.fuse]

STUCK = "stuck.service"


def _make_dirs(directory: Path, owner: UserSandbox | None = None) -> None:
    """``mkdir -p`` as ``owner``."""
    for path in reversed([directory, *directory.parents]):
        if not path.exists():
            path.mkdir()
            if owner is not None:
                os.chown(path, owner.account.uid, owner.account.gid)


def _link(link: Path, target: Path, owner: UserSandbox | None = None) -> None:
    """Point ``link`` at ``target`` (replacing it whole, as nix-env moves a profile), as ``owner``."""
    _make_dirs(link.parent, owner)
    temporary = link.with_name(f".{link.name}.tmp")
    temporary.symlink_to(target)
    if owner is not None:
        os.chown(temporary, owner.account.uid, owner.account.gid, follow_symlinks=False)
    temporary.replace(link)


def _main_thread_ended(daemon: DaemonProcess) -> bool:
    """The daemon returned from main: gone, or a zombie whose hung thread only the kernel holds.

    A thread in a FUSE call the server has read waits uninterruptibly (fs/fuse/dev.c,
    request_wait_answer), even through SIGKILL; no process can end it, only an answer can.
    """
    if daemon.proc.poll() is not None:
        return True
    try:
        stat = Path(f"/proc/{daemon.proc.pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rpartition(")")[2].split()[0] == "Z"


def _stops_while_hung(daemon: DaemonProcess, mount: HungFs) -> None:
    """SIGTERM while a read hangs: the daemon finishes; released, the process is reaped with 0."""
    daemon.signal(signal.SIGTERM)
    poll(lambda: _main_thread_ended(daemon), message="the daemon to finish while a read hangs")
    assert "event=daemon.stopped" in daemon.log()
    mount.release()
    assert daemon.proc.wait(timeout=WAIT) == 0


# --- host mode ------------------------------------------------------------------------------


@pytest.mark.host
class TestHostHungMount:
    """One user's reads hang in a dead mount; every other user is followed as before."""

    def test_another_users_drift_is_detected_while_one_users_reads_hang(
        self, host_sandbox: HostSandbox, tmp_path: Path
    ) -> None:
        """Alice's profile and a unit link lead into a hung mount: Bob's drift is still seen,
        the loop answers, and once the mount answers Alice's dangling link is a finding."""
        alice, bob = host_sandbox.add_user(), host_sandbox.add_user()
        profile = alice.home / PROFILE
        _make_dirs(profile.parent, alice)  # there from the start, so it is watched
        with (
            host_process(host_sandbox, tmp_path, [alice, bob]) as daemon,
            HungFs(host_sandbox.root / "net") as mount,
        ):
            # The look for a running Home Manager switch follows the profile into the mount.
            _link(profile, mount.mountpoint / "home-manager-2-link", alice)
            mount.wait_held()
            stuck = alice.config_dir / STUCK
            _link(stuck, mount.mountpoint / STUCK, alice)
            edited = replace_link(bob)
            poll(
                lambda: process_user_has(daemon, bob, edited),
                message="Bob's drift, Alice's reads hung",
            )
            assert daemon.get("/-/healthy")[0] == 200
            assert daemon.metric("provenanced_ready", user=bob.account.name) == 1
            mount.release()
            poll(
                lambda: process_user_has(daemon, alice, stuck),
                message="Alice's link, once answered",
            )

    def test_the_daemon_stops_while_a_users_read_hangs(
        self, host_sandbox: HostSandbox, tmp_path: Path
    ) -> None:
        """SIGTERM while a unit link's target hangs: the daemon finishes, nothing joins the read."""
        carol = host_sandbox.add_user()
        with (
            host_process(host_sandbox, tmp_path, [carol]) as daemon,
            HungFs(host_sandbox.root / "net") as mount,
        ):
            _link(carol.config_dir / STUCK, mount.mountpoint / STUCK, carol)
            mount.wait_held()
            _stops_while_hung(daemon, mount)


# --- user mode ------------------------------------------------------------------------------


class TestUserHungMount:
    """The user's own daemon: a hung mount stalls its reads, never its event loop."""

    def test_the_loop_answers_while_the_profile_hangs(
        self, fresh_sandbox: Sandbox, tmp_path: Path
    ) -> None:
        """The look for a Home Manager switch follows the profile into a hung mount: /-/healthy
        still answers (a stalled loop says 503, and systemd's watchdog would kill it)."""
        profile = fresh_sandbox.home / PROFILE
        _make_dirs(profile.parent)
        with (
            daemon_process(fresh_sandbox, tmp_path, config_toml(fresh_sandbox)) as daemon,
            HungFs(tmp_path / "net") as mount,
        ):
            _link(profile, mount.mountpoint / "home-manager-2-link")
            mount.wait_held()
            assert daemon.get("/-/healthy")[0] == 200
            _stops_while_hung(daemon, mount)

    def test_the_daemon_stops_while_a_read_hangs(
        self, fresh_sandbox: Sandbox, tmp_path: Path
    ) -> None:
        """SIGTERM while a unit link's target hangs: nothing joins the thread stuck in the read."""
        with (
            daemon_process(fresh_sandbox, tmp_path, config_toml(fresh_sandbox)) as daemon,
            HungFs(tmp_path / "net") as mount,
        ):
            _link(fresh_sandbox.config_dir / STUCK, mount.mountpoint / STUCK)
            mount.wait_held()
            _stops_while_hung(daemon, mount)

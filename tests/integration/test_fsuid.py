"""Reading a user's files on a thread holding only that user's filesystem rights, with real users."""

from __future__ import annotations

import hashlib
import os
import pickle
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import pytest

from provenanced.expect.generation import GCROOT, read_generation
from provenanced.fs.facts import FactReader, scan_unit_dir
from provenanced.fs.fsuid import (
    AsUserError,
    Credentials,
    UserThread,
    check_thread,
    thread_credentials,
)
from provenanced.model import FileFact, FileKind, Tier, UnitDir
from provenanced.sandbox import Account, HostSandbox, UserSandbox

pytestmark = [pytest.mark.integration, pytest.mark.host]

SHADOW = Path("/etc/shadow")


def _own(path: Path, account: Account) -> None:
    os.chown(path, account.uid, account.gid, follow_symlinks=False)


def _plant_link(user: UserSandbox, name: str, target: Path | str) -> Path:
    """A unit file in the user's config dir that the user made a link to ``target``."""
    link = user.config_dir / name
    link.symlink_to(target)
    _own(link, user.account)
    return link


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _facts_as(account: Account, paths: Iterable[str]) -> dict[str, FileFact]:
    """FactReader run in a forked child that became the user: the reference for the helper."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.close(read_fd)
            os.setgroups(list(account.groups))
            os.setresgid(account.gid, account.gid, account.gid)
            os.setresuid(account.uid, account.uid, account.uid)
            data = pickle.dumps([FactReader().read(p) for p in paths])
            while data:
                data = data[os.write(write_fd, data) :]
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    facts: list[FileFact] = pickle.loads(data)
    return {fact.path: fact for fact in facts}


@pytest.fixture(scope="module")
def user(host_sandbox: HostSandbox) -> UserSandbox:
    """A real user with the example Home Manager tree; no manager needed to read files."""
    return host_sandbox.add_user(boot=False)


@pytest.fixture(scope="module")
def neighbour(host_sandbox: HostSandbox) -> UserSandbox:
    """Another real user, whose private files the first must not see."""
    return host_sandbox.add_user(boot=False)


@pytest.fixture
async def helper(user: UserSandbox) -> AsyncIterator[UserThread]:
    """A thread holding the user's credentials, closed after the test."""
    started = await UserThread.start(Credentials.of_uid(user.account.uid))
    try:
        yield started
    finally:
        started.close()


class TestLeak:
    """What the user could not read is never read for them: no hash, no listing, no link."""

    async def test_a_unit_linked_to_etc_shadow(self, user: UserSandbox, helper: UserThread) -> None:
        """On the user's thread: permission denied and no hash; root's own read hashes shadow."""
        link = _plant_link(user, "shadow.service", SHADOW)
        fact = (await helper.facts([str(link)]))[str(link)]
        assert fact.kind is FileKind.SYMLINK and fact.resolved == str(SHADOW)
        assert (fact.sha256, fact.error) == (None, "Permission denied")
        secret = _digest(SHADOW)
        assert secret not in repr(fact)
        # The contrast: the same read with root's rights would have leaked the digest.
        assert FactReader().read(str(link)).sha256 == secret

    async def test_a_unit_linked_to_a_neighbours_private_file(
        self,
        host_sandbox: HostSandbox,
        user: UserSandbox,
        neighbour: UserSandbox,
        helper: UserThread,
    ) -> None:
        """A 0600 file of another user, in a directory anyone may cross, is not hashed."""
        shared = host_sandbox.root / "shared"
        shared.mkdir(mode=0o755, exist_ok=True)
        secret = shared / f"{neighbour.account.name}.conf"
        secret.write_text("[Service]\nEnvironment=TOKEN=hunter2\n")
        secret.chmod(0o600)
        _own(secret, neighbour.account)
        link = _plant_link(user, "neighbour.service", secret)
        fact = (await helper.facts([str(link)]))[str(link)]
        assert (fact.sha256, fact.error) == (None, "Permission denied")
        assert FactReader().read(str(link)).sha256 == _digest(secret)

    async def test_a_unit_linked_into_a_neighbours_private_home(
        self, user: UserSandbox, neighbour: UserSandbox, helper: UserThread
    ) -> None:
        """Behind a 0700 home the link does not even resolve for the user; root would hash it."""
        secret = neighbour.home / "notes.service"
        secret.write_text("[Unit]\nDescription=private\n")
        _own(secret, neighbour.account)
        link = _plant_link(user, "notes.service", secret)
        fact = (await helper.facts([str(link)]))[str(link)]
        assert (fact.resolved, fact.sha256, fact.error) == (None, None, "Permission denied")
        assert FactReader().read(str(link)).sha256 == _digest(secret)

    async def test_a_unit_dir_linked_to_a_root_only_dir(
        self, host_sandbox: HostSandbox, user: UserSandbox, helper: UserThread
    ) -> None:
        """A unit dir that is a link to a root-only directory lists nothing for the user."""
        private = host_sandbox.root / "root-only"
        private.mkdir(mode=0o700, exist_ok=True)
        (private / "id_ed25519").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
        data_dir = user.home / ".local/share/systemd/user"
        data_dir.parent.mkdir(parents=True, exist_ok=True)
        data_dir.symlink_to(private)
        _own(data_dir, user.account)
        assert await helper.scan([str(data_dir)]) == ()
        assert list(scan_unit_dir(str(data_dir))) == [str(data_dir / "id_ed25519")]

    async def test_a_gcroot_linked_to_a_root_only_generation(
        self, host_sandbox: HostSandbox, neighbour: UserSandbox
    ) -> None:
        """A gcroot into a root-only "generation" yields no links for the user; root's read would."""
        fake = host_sandbox.root / "root-only-generation"
        unit = fake / "home-files/.config/systemd/user/stolen.service"
        unit.parent.mkdir(parents=True, exist_ok=True)
        unit.write_text("[Unit]\nDescription=root only\n")
        fake.chmod(0o700)
        gcroot = neighbour.home / GCROOT
        gcroot.unlink()
        gcroot.symlink_to(fake)
        _own(gcroot, neighbour.account)
        dirs = (UnitDir(str(neighbour.config_dir), Tier.CONFIG, 0),)
        helper = await UserThread.start(Credentials.of_uid(neighbour.account.uid))
        try:
            generation = await helper.generation(str(neighbour.home), dirs)
        finally:
            helper.close()
        assert (generation.path, dict(generation.links)) == (None, {})
        as_root = read_generation(str(neighbour.home), dirs, FactReader())
        assert [link.sha256 for link in as_root.links.values()] == [_digest(unit)]


class TestSameAsTheUser:
    """Where the user may read, the thread reads exactly what FactReader reads as that user."""

    async def test_every_kind_of_file(self, user: UserSandbox, helper: UserThread) -> None:
        """Links into the store, a drop-in, a directory, a FIFO, a dangling link, a missing path."""
        fifo = user.config_dir / "pipe.service"
        os.mkfifo(fifo)
        _own(fifo, user.account)
        _plant_link(user, "gone.service", user.home / "nowhere")
        paths = [*scan_unit_dir(str(user.config_dir)), str(user.config_dir), str(user.home / "x")]
        got = await helper.facts(paths)
        assert got == _facts_as(user.account, paths)
        kinds = {fact.kind for fact in got.values()}
        assert kinds == {FileKind.SYMLINK, FileKind.OTHER, FileKind.DIRECTORY, FileKind.MISSING}
        hashed = [f for f in got.values() if f.sha256 is not None]
        assert len(hashed) >= 4  # the example units, their drop-in and the enablement links

    async def test_scan_and_generation(self, user: UserSandbox, helper: UserThread) -> None:
        """Listing unit dirs and following the gcroot give what the library gives the user."""
        assert set(await helper.scan([str(user.config_dir)])) == set(
            scan_unit_dir(str(user.config_dir))
        )
        dirs = (UnitDir(str(user.config_dir), Tier.CONFIG, 0),)
        generation = await helper.generation(str(user.home), dirs)
        assert generation == read_generation(str(user.home), dirs, FactReader())
        assert generation.links  # the example units are linked


class TestUserThread:
    """The thread holds the user's filesystem rights; the rest of the process keeps root's."""

    def test_it_acts_as_the_user_and_nothing_more(
        self, user: UserSandbox, helper: UserThread
    ) -> None:
        """fsuid, fsgid and groups are the user's, no filesystem capability is left; ours is root."""
        check_thread(helper.tid, helper.creds)
        with open(f"/proc/self/task/{helper.tid}/status", encoding="ascii") as status:
            uid_line = next(line for line in status if line.startswith("Uid:"))
        assert uid_line.split()[1:] == ["0", "0", "0", str(user.account.uid)]
        # The raw setgroups and setfsuid touched only that thread: this one is still root.
        fsuid, _fsgid, groups, caps = thread_credentials(threading.get_native_id())
        assert (fsuid, set(groups) == set(user.account.groups)) == (0, False)
        assert caps & 0b10  # CAP_DAC_OVERRIDE
        assert SHADOW.read_bytes()

    def test_a_thread_that_is_not_the_user_is_refused(self, user: UserSandbox) -> None:
        """The outside check reads /proc: this root thread is refused."""
        with pytest.raises(AsUserError, match="does not act as"):
            check_thread(threading.get_native_id(), Credentials.of_uid(user.account.uid))

    async def test_a_hung_read_stalls_only_its_own_user(
        self, user: UserSandbox, neighbour: UserSandbox, helper: UserThread
    ) -> None:
        """One user's thread blocked (a stuck FUSE read) leaves another user's reads going."""
        release = threading.Event()
        stuck = helper.run(release.wait)
        other = await UserThread.start(Credentials.of_uid(neighbour.account.uid))
        try:
            facts = await other.facts([str(neighbour.config_dir)])
            assert facts[str(neighbour.config_dir)].kind is FileKind.DIRECTORY
        finally:
            release.set()
            await stuck
            other.close()

    def test_a_hung_call_does_not_keep_the_process_alive(self, user: UserSandbox) -> None:
        """A call blocked forever on a user's thread: the interpreter still exits when done."""
        code = (
            "import asyncio, threading\n"
            "from provenanced.fs.fsuid import Credentials, UserThread\n"
            "async def main():\n"
            f"    thread = await UserThread.start(Credentials.of_uid({user.account.uid}))\n"
            "    thread.executor().submit(threading.Event().wait)\n"
            "asyncio.run(main())\n"
            "print('done', flush=True)\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
        )
        assert (done.returncode, done.stdout) == (0, "done\n")

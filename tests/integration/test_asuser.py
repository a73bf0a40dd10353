"""Reading a user's files through a helper holding only that user's rights, with real users."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import pytest

from helpers import wait_until
from provenanced.expect.generation import GCROOT, read_generation
from provenanced.fs import wire
from provenanced.fs.asuser import BATCH, AsUserError, Credentials, UserHelper, check_credentials
from provenanced.fs.facts import FactReader, scan_unit_dir
from provenanced.model import FileFact, FileKind, Tier, UnitDir
from provenanced.sandbox import Account, HostSandbox, UserSandbox

pytestmark = [pytest.mark.integration, pytest.mark.host]

SHADOW = Path("/etc/shadow")
SYSTEM_PYTHON = "/usr/bin/python3"
# ptrace(PTRACE_ATTACH) then PTRACE_DETACH from the system Python; exit status = errno.
_PTRACE_PROBE = (
    "import ctypes, sys\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "pid = int(sys.argv[1])\n"
    "if libc.ptrace(16, pid, 0, 0) != 0:\n"
    "    sys.exit(ctypes.get_errno())\n"
    "import os; os.waitpid(pid, 0); libc.ptrace(17, pid, 0, 0)\n"
)


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
            facts = [wire.to_wire(FactReader().read(p)) for p in paths]
            data = json.dumps(facts).encode()
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
    facts = wire.from_wire(tuple[FileFact, ...], json.loads(data))
    return {fact.path: fact for fact in facts}


def _run_as(account: Account, argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        user=account.uid,
        group=account.gid,
        extra_groups=list(account.groups),
        cwd="/",
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.fixture(scope="module")
def user(host_sandbox: HostSandbox) -> UserSandbox:
    """A real user with the example Home Manager tree; no manager needed to read files."""
    return host_sandbox.add_user(boot=False)


@pytest.fixture(scope="module")
def neighbour(host_sandbox: HostSandbox) -> UserSandbox:
    """Another real user, whose private files the first must not see."""
    return host_sandbox.add_user(boot=False)


@pytest.fixture
async def helper(user: UserSandbox) -> AsyncIterator[UserHelper]:
    """A helper holding the user's credentials, closed after the test."""
    started = await UserHelper.start(Credentials.of_uid(user.account.uid))
    try:
        yield started
    finally:
        await started.close()


class TestLeak:
    """What the user could not read is never read for them: no hash, no listing, no link."""

    async def test_a_unit_linked_to_etc_shadow(self, user: UserSandbox, helper: UserHelper) -> None:
        """Through the helper: permission denied and no hash; root's own read hashes shadow."""
        link = _plant_link(user, "shadow.service", SHADOW)
        fact = (await helper.facts([str(link)]))[str(link)]
        assert fact.kind is FileKind.SYMLINK and fact.resolved == str(SHADOW)
        assert (fact.sha256, fact.error) == (None, "Permission denied")
        secret = _digest(SHADOW)
        assert secret not in json.dumps(wire.to_wire(fact))
        # The contrast: the same read with root's rights would have leaked the digest.
        assert FactReader().read(str(link)).sha256 == secret

    async def test_a_unit_linked_to_a_neighbours_private_file(
        self,
        host_sandbox: HostSandbox,
        user: UserSandbox,
        neighbour: UserSandbox,
        helper: UserHelper,
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
        self, user: UserSandbox, neighbour: UserSandbox, helper: UserHelper
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
        self, host_sandbox: HostSandbox, user: UserSandbox, helper: UserHelper
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
        helper = await UserHelper.start(Credentials.of_uid(neighbour.account.uid))
        try:
            generation = await helper.generation(str(neighbour.home), dirs)
        finally:
            await helper.close()
        assert (generation.path, dict(generation.links)) == (None, {})
        as_root = read_generation(str(neighbour.home), dirs, FactReader())
        assert [link.sha256 for link in as_root.links.values()] == [_digest(unit)]


class TestSameAsTheUser:
    """Where the user may read, the helper reads exactly what FactReader reads as that user."""

    async def test_every_kind_of_file(self, user: UserSandbox, helper: UserHelper) -> None:
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

    async def test_scan_and_generation(self, user: UserSandbox, helper: UserHelper) -> None:
        """Listing unit dirs and following the gcroot give what the library gives the user."""
        assert set(await helper.scan([str(user.config_dir)])) == set(
            scan_unit_dir(str(user.config_dir))
        )
        dirs = (UnitDir(str(user.config_dir), Tier.CONFIG, 0),)
        generation = await helper.generation(str(user.home), dirs)
        assert generation == read_generation(str(user.home), dirs, FactReader())
        assert generation.links  # the example units are linked

    async def test_more_paths_than_one_batch(self, user: UserSandbox, helper: UserHelper) -> None:
        """Many paths go out in several requests and come back keyed by path, none lost."""
        paths = [str(user.home / f"missing-{i}.service") for i in range(BATCH * 2 + 7)]
        got = await helper.facts(paths)
        assert list(got) == paths
        assert {fact.kind for fact in got.values()} == {FileKind.MISSING}


class TestHelperProcess:
    """The helper holds the user's rights and nothing else; its failures are clear and final."""

    def test_it_runs_as_the_user_and_nothing_more(
        self, user: UserSandbox, helper: UserHelper
    ) -> None:
        """Every uid and gid is the user's, the groups are theirs, no capability is left."""
        status = dict(
            line.split(":", 1)
            for line in Path(f"/proc/{helper.pid}/status").read_text().splitlines()
        )
        assert status["Uid"].split() == [str(user.account.uid)] * 4
        assert status["Gid"].split() == [str(user.account.gid)] * 4
        assert status["Groups"].split() == [str(g) for g in user.account.groups]
        for key in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
            assert int(status[key], 16) == 0, key

    def test_a_process_that_is_not_the_user_is_refused(self, user: UserSandbox) -> None:
        """The outside check reads /proc: this root process is refused for every mismatch."""
        creds = Credentials.of_uid(user.account.uid)
        with pytest.raises(AsUserError, match=r"Uid .*Gid .*Groups .*CapPrm .*CapEff"):
            check_credentials(os.getpid(), creds)

    def test_the_user_cannot_ptrace_it(self, user: UserSandbox, helper: UserHelper) -> None:
        """The user may ptrace their own processes, but not the helper (EPERM)."""
        own = subprocess.Popen(["sleep", "infinity"], user=user.account.uid, group=user.account.gid)
        try:
            attach_own = _run_as(
                user.account, [SYSTEM_PYTHON, "-I", "-c", _PTRACE_PROBE, str(own.pid)]
            )
            assert attach_own.returncode == 0, attach_own.stderr
        finally:
            own.kill()
            own.wait()
        probe = _run_as(user.account, [SYSTEM_PYTHON, "-I", "-c", _PTRACE_PROBE, str(helper.pid)])
        assert probe.returncode == 1  # EPERM
        assert helper.alive

    async def test_killed_helper_is_one_clear_error_then_a_new_one_works(
        self, user: UserSandbox
    ) -> None:
        """The user kills the helper: the call fails naming it, later calls too, a new one reads."""
        creds = Credentials.of_uid(user.account.uid)
        helper = await UserHelper.start(creds)
        kill = _run_as(user.account, ["kill", "-KILL", str(helper.pid)])
        assert kill.returncode == 0, kill.stderr
        with pytest.raises(AsUserError, match=rf"{creds.name}.*pid {helper.pid}.*signal 9"):
            await helper.facts([str(user.config_dir)])
        assert not helper.alive
        with pytest.raises(AsUserError, match="signal 9"):
            await helper.scan([str(user.config_dir)])
        replacement = await UserHelper.start(creds)
        try:
            got = await replacement.facts([str(user.config_dir)])
            assert got[str(user.config_dir)].kind is FileKind.DIRECTORY
        finally:
            await replacement.close()

    async def test_a_stopped_helper_times_out_and_is_killed(self, user: UserSandbox) -> None:
        """SIGSTOPped by the user, the helper misses its deadline; it is killed, not waited on."""
        helper = await UserHelper.start(Credentials.of_uid(user.account.uid), timeout=1.0)
        os.kill(helper.pid, signal.SIGSTOP)
        with pytest.raises(AsUserError, match=r"no answer to facts within 1 s"):
            await helper.facts([str(user.config_dir)])
        assert not helper.alive
        assert not Path(f"/proc/{helper.pid}").exists()

    def test_it_exits_when_its_daemon_dies(self, user: UserSandbox) -> None:
        """A daemon killed with SIGKILL leaves no helper behind: it sees its input close."""
        code = (
            "import asyncio, sys\n"
            "from provenanced.fs.asuser import Credentials, UserHelper\n"
            "async def main():\n"
            "    helper = await UserHelper.start(Credentials.of_uid(int(sys.argv[1])))\n"
            "    print(helper.pid, flush=True)\n"
            "    await asyncio.Event().wait()\n"
            "asyncio.run(main())\n"
        )
        daemon = subprocess.Popen(
            [sys.executable, "-c", code, str(user.account.uid)], stdout=subprocess.PIPE, text=True
        )
        try:
            assert daemon.stdout is not None
            pid = int(daemon.stdout.readline())
            assert Path(f"/proc/{pid}").exists()
        finally:
            daemon.kill()
            daemon.wait()
        wait_until(lambda: not Path(f"/proc/{pid}").exists(), message="helper gone")

    async def test_close_ends_it(self, user: UserSandbox) -> None:
        """close() lets the helper exit by itself and later calls say it was closed."""
        helper = await UserHelper.start(Credentials.of_uid(user.account.uid))
        await helper.close()
        assert not Path(f"/proc/{helper.pid}").exists()
        with pytest.raises(AsUserError, match="was closed"):
            await helper.facts(["/"])

    async def test_concurrent_callers_take_turns(
        self, user: UserSandbox, helper: UserHelper
    ) -> None:
        """Requests from several tasks never interleave on the pipe."""
        paths = [[str(user.home / f"t{t}-{i}") for i in range(50)] for t in range(8)]
        results = await asyncio.gather(*(helper.facts(p) for p in paths))
        assert [list(r) for r in results] == paths

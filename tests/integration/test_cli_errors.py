"""Bad input to the real CLI: one stderr line, the documented exit code, never a traceback."""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from provenanced.commands.portcheck import PortTakenError, check_port
from provenanced.sandbox import Sandbox

pytestmark = pytest.mark.integration

WEB = "podman-web.service"
# A config read that does not stop (/dev/zero) dies here instead of eating the machine's memory.
_MEMORY_CAP = 1 << 30


def _cap_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (_MEMORY_CAP, _MEMORY_CAP))


def provenanced(
    env: dict[str, str], *args: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run the CLI as a user would, memory-capped, with a generous bound on its run time."""
    return subprocess.run(
        [sys.executable, "-m", "provenanced", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        preexec_fn=_cap_memory,
    )


def _file(content: bytes) -> Callable[[Path], Path]:
    def write(directory: Path) -> Path:
        path = directory / "config.toml"
        path.write_bytes(content)
        return path

    return write


def _fifo(directory: Path) -> Path:
    path = directory / "config.toml"
    os.mkfifo(path)
    return path


def _dev_zero(_: Path) -> Path:
    return Path("/dev/zero")


_DEEP = b"[" * 5000 + b"]" * 5000
# Comments only: valid TOML, but twice the 1 MiB cap on a config file.
_HUGE = b"#" * (2 << 20)
_GOOD = _file(b"")

BAD_CONFIGS = [
    pytest.param(_file(b"[metrics]\nlisten = 'x'\n"), {}, "metrics.listen", id="invalid-value"),
    pytest.param(
        _GOOD,
        {"PROVENANCED_POLICY__HEAL": '{"link-replaced": '},
        "PROVENANCED_POLICY__HEAL",
        id="heal-invalid-json",
    ),
    pytest.param(
        _GOOD,
        {"PROVENANCED_PROVENANCE__MANAGED_ROOTS": "[/nix/store"},
        "PROVENANCED_PROVENANCE__MANAGED_ROOTS",
        id="managed-roots-invalid-json",
    ),
    pytest.param(
        _GOOD,
        {"PROVENANCED_PROVENANCE__MANAGED_ROOTS": _DEEP.decode()},
        "nested too deeply",
        id="managed-roots-json-5000-deep",
    ),
    pytest.param(_file(b"\xff\xfe[policy]\n"), {}, "not UTF-8", id="not-utf8"),
    pytest.param(_file(b"x = " + _DEEP + b"\n"), {}, "nested too deeply", id="toml-5000-deep"),
    pytest.param(_file(b"[manager]\ncall_timeout = inf\n"), {}, "manager.call_timeout", id="inf"),
    pytest.param(
        _file(b"[manager]\ncall_timeout = 1e999\n"), {}, "manager.call_timeout", id="1e999"
    ),
    pytest.param(_file(b"[policy]\nquiet_window = nan\n"), {}, "policy.quiet_window", id="nan"),
    pytest.param(
        _GOOD,
        {"PROVENANCED_POLICY__RESYNC_INTERVAL": "inf"},
        "policy.resync_interval",
        id="inf-from-env",
    ),
    pytest.param(
        _file(b'[policy.heal]\n"a\\nb" = "heal"\n'), {}, "policy.heal.a\\nb", id="newline-in-key"
    ),
    pytest.param(_file(_HUGE), {}, "larger than", id="over-the-size-cap"),
    pytest.param(_dev_zero, {}, "not a regular file", id="dev-zero"),
    pytest.param(_fifo, {}, "not a regular file", id="fifo"),
]


class TestBadConfiguration:
    @pytest.mark.parametrize(("config", "env", "names"), BAD_CONFIGS)
    def test_one_line_and_exit_2(
        self,
        tmp_path: Path,
        config: Callable[[Path], Path],
        env: dict[str, str],
        names: str,
    ) -> None:
        """Whatever is wrong with the file or the environment: one line naming it, exit 2."""
        base = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "LANG": "C.UTF-8"}
        # A read that never ends or never starts (/dev/zero, a FIFO) fails the bound here.
        result = provenanced(
            {**base, **env}, "--config", str(config(tmp_path)), "check-config", timeout=30
        )
        assert (result.returncode, result.stdout) == (2, ""), result.stderr[-2000:]
        assert result.stderr.startswith("provenanced: ") and result.stderr.count("\n") == 1
        assert names in result.stderr


# (arguments, exit code, what the one line says); a verdict goes to stdout, errors to stderr.
EXIT_CODES = [
    pytest.param(("show", "t@.service"), 2, "template", id="show-template"),
    pytest.param(("show", "../x"), 2, "not a valid unit name", id="show-dot-dot"),
    pytest.param(("restart", "--verify", "missing.service"), 1, "not found", id="no-such-unit"),
    pytest.param(("restart", "--verify", "../x"), 2, "not a valid unit name", id="dot-dot"),
    pytest.param(("restart", "--verify", "a\nb.service"), 2, "not a valid unit name", id="newline"),
    pytest.param(
        ("restart", "--verify", "a" * 5000 + ".service"), 2, "longer than 255", id="5000-chars"
    ),
    pytest.param(("restart", "--verify", "t@.service"), 2, "template", id="restart-template"),
    *(
        pytest.param(
            ("restart", "--verify", "--timeout", value, WEB), 2, "--timeout", id=f"timeout-{value}"
        )
        for value in ("-1", "0", "nan", "inf")
    ),
    pytest.param(("restart", "--verify", WEB), 0, "restarted and verified", id="verified"),
    pytest.param(("install", "--listen", "nowhere"), 2, "--listen", id="install-listen"),
    pytest.param(("install", "--host", "--socket"), 2, "--socket", id="install-host-socket"),
]


class TestExitCodes:
    @pytest.mark.parametrize(("args", "code", "says"), EXIT_CODES)
    def test_exit_code_and_one_line(
        self, sandbox: Sandbox, args: tuple[str, ...], code: int, says: str
    ) -> None:
        """With the manager answering, a bad name or timeout is 2 and an unknown unit 1, never 3."""
        before = sandbox.show(WEB, "InvocationID")["InvocationID"]
        result = provenanced(sandbox.env, *args)
        answer, other = (
            (result.stdout, result.stderr) if code == 0 else (result.stderr, result.stdout)
        )
        assert result.returncode == code, result.stdout + result.stderr
        assert answer.count("\n") == 1 and says in answer, answer
        assert other == ""
        if code != 0:
            # Refused before anything was touched: the unit was not restarted.
            assert sandbox.show(WEB, "InvocationID")["InvocationID"] == before


class TestInstallPortTaken:
    """A user-mode install on a port another user's daemon holds says so, and how to fix it."""

    def test_a_real_listener_of_another_uid(self) -> None:
        """A socket bound by uid 65534 (nobody) on a free port: check_port names that uid."""
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        code = (
            "import socket, sys; s = socket.socket(); "
            f"s.bind(('127.0.0.1', {port})); s.listen(); print('up', flush=True); sys.stdin.read()"
        )
        other = subprocess.Popen(
            [
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "/usr/bin/python3",
                "-c",
                code,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert other.stdout is not None and other.stdout.readline() == "up\n"
            with pytest.raises(PortTakenError, match="uid 65534"):
                check_port(f"127.0.0.1:{port}", os.getuid())
        finally:
            other.kill()
            other.wait(timeout=10)

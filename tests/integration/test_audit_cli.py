"""`provenanced audit` and `show` against a real sandboxed user manager: inject drift, detect it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from provenanced.sandbox import Sandbox

pytestmark = pytest.mark.integration

WEB = "podman-web.service"


def provenanced(
    sandbox: Sandbox, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the CLI as a user of the sandboxed manager would."""
    return subprocess.run(
        [sys.executable, "-m", "provenanced", *args],
        env={**sandbox.env, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def audit_json(sandbox: Sandbox, *patterns: str) -> tuple[int, dict[str, object]]:
    result = provenanced(sandbox, "audit", "--json", *patterns)
    assert result.returncode in (0, 1), result.stderr
    return result.returncode, json.loads(result.stdout)


def found(sandbox: Sandbox) -> set[tuple[str, str, str]]:
    """(kind, unit, path) of every finding, paths relative to the sandbox root."""
    _, document = audit_json(sandbox)
    findings = document["findings"]
    assert isinstance(findings, list)
    return {
        (f["kind"], f["unit"], os.path.relpath(f["path"], sandbox.root) if f["path"] else "")
        for f in findings
    }


@pytest.fixture(scope="module", autouse=True)
def accepted(sandbox: Sandbox) -> None:
    """Accept the clean example tree as the baseline before any drift is injected."""
    result = provenanced(sandbox, "baseline", "accept")
    assert result.returncode == 0, result.stderr


@pytest.fixture
def restore(sandbox: Sandbox) -> Iterator[None]:
    """Put the Home Manager tree back, drop injected files and reload after each test."""
    yield
    for path in (sandbox.admin_dir, sandbox.home / ".config/systemd/user.control"):
        if path.exists():
            shutil.rmtree(path)
    sandbox.admin_dir.mkdir(parents=True, exist_ok=True)
    for extra in sandbox.config_dir.glob("extra*"):
        extra.unlink()
    assert sandbox.generation is not None
    from provenanced.sandbox import activate

    for rel in sandbox.generation.files:
        target = sandbox.home / rel
        if target.is_symlink() or target.exists():
            target.unlink()
    activate(sandbox.home, sandbox.generation)
    sandbox.daemon_reload()
    assert found(sandbox) == set()


def rel(sandbox: Sandbox, path: Path) -> str:
    return os.path.relpath(path, sandbox.root)


class TestAuditCli:
    def test_clean_tree_has_no_findings(self, sandbox: Sandbox) -> None:
        """A Home Manager tree exactly as activated gives exit 0 and zero findings."""
        code, document = audit_json(sandbox)
        assert code == 0, document
        assert document["findings"] == []
        assert isinstance(document["units"], int) and document["units"] > 5
        assert isinstance(document["duration_seconds"], float)

    def test_table_output_and_exit_code(self, sandbox: Sandbox, restore: None) -> None:
        """The readable table names unit, kind and path, and findings give exit 1."""
        (sandbox.config_dir / "extra-notes.service").write_text("[Service]\nExecStart=/bin/true\n")
        result = provenanced(sandbox, "audit")
        assert result.returncode == 1
        assert "extra-notes.service" in result.stdout and "unmanaged-unit" in result.stdout

    @pytest.mark.parametrize("latent", [True, False], ids=["latent", "divergent"])
    def test_link_replaced(self, sandbox: Sandbox, restore: None, latent: bool) -> None:
        """A managed link replaced by a regular file is link-replaced, latent or divergent by content."""
        path = sandbox.config_dir / WEB
        content = path.read_text() if latent else path.read_text() + "\n# local edit\n"
        path.unlink()
        path.write_text(content)
        sandbox.daemon_reload()
        _, document = audit_json(sandbox)
        findings = [f for f in document["findings"] if f["kind"] == "link-replaced"]  # type: ignore[union-attr]
        assert [f["path"] for f in findings] == [str(path)]
        assert findings[0]["detail"].startswith("latent" if latent else "divergent")
        assert {f[0] for f in found(sandbox)} == {"link-replaced"}

    def test_link_retargeted_dangling_orphan_missing(self, sandbox: Sandbox, restore: None) -> None:
        """Each way a managed link can go wrong is named by its own kind."""
        other = sandbox.store / "0000000000000000000000000000000a-other.service"
        other.write_text("[Service]\nExecStart=/bin/true\n")
        web = sandbox.config_dir / WEB
        web.unlink()
        web.symlink_to(other)
        dropin = sandbox.config_dir / f"{WEB}.d/10-env.conf"
        dropin.unlink()
        dropin.symlink_to(sandbox.store / "missing-10-env.conf")
        timer = sandbox.config_dir / "backup.timer"
        timer.unlink()
        orphan = sandbox.config_dir / "extra-old.service"
        orphan.symlink_to(
            sandbox.store
            / "11111111111111111111111111111111-home-manager-files/x/extra-old.service"
        )
        sandbox.daemon_reload()
        assert found(sandbox) == {
            ("link-retargeted", WEB, rel(sandbox, web)),
            ("link-dangling", WEB, rel(sandbox, dropin)),
            ("managed-missing", "backup.timer", rel(sandbox, timer)),
            ("link-dangling", "extra-old.service", rel(sandbox, orphan)),
            # The manager's own verdicts on the same damage: the timer Home Manager provides is
            # gone, and a drop-in it cannot stat keeps NeedDaemonReload=yes even after a reload.
            ("load-error", "backup.timer", rel(sandbox, timer)),
            ("stale-load", WEB, rel(sandbox, web)),
        }

    def test_orphan_link(self, sandbox: Sandbox, restore: None) -> None:
        """A link into another generation's home-manager-files is an orphan."""
        old_files = sandbox.store / "22222222222222222222222222222222-home-manager-files"
        target = old_files / ".config/systemd/user/extra-old.service"
        target.parent.mkdir(parents=True)
        store_file = sandbox.store / "33333333333333333333333333333333-extra-old.service"
        store_file.write_text("[Service]\nExecStart=/bin/true\n")
        target.symlink_to(store_file)
        link = sandbox.config_dir / "extra-old.service"
        link.symlink_to(target)
        try:
            assert found(sandbox) == {("orphan-link", "extra-old.service", rel(sandbox, link))}
        finally:
            link.unlink()
            shutil.rmtree(old_files)
            store_file.unlink()

    def test_unmanaged_dropin_admin_and_control(self, sandbox: Sandbox, restore: None) -> None:
        """A stale admin drop-in and a set-property drop-in are both unmanaged-dropin."""
        admin = sandbox.admin_dir / f"{WEB}.d/stale.conf"
        admin.parent.mkdir(parents=True)
        admin.write_text("[Service]\nEnvironment=STALE=1\n")
        sandbox.systemctl("set-property", WEB, "CPUWeight=50")
        sandbox.daemon_reload()
        got = found(sandbox)
        assert ("unmanaged-dropin", WEB, rel(sandbox, admin)) in got
        control = [f for f in got if "user.control" in f[2]]
        assert control and all(f[0] == "unmanaged-dropin" and f[1] == WEB for f in control)
        assert {f[0] for f in got} == {"unmanaged-dropin"}

    def test_shadowed_and_masked(self, sandbox: Sandbox, restore: None) -> None:
        """A higher-priority fragment shadows the managed one; a /dev/null link masks it."""
        shadow = sandbox.admin_dir / WEB
        shadow.write_text("[Service]\nExecStart=/bin/sleep infinity\n")
        mask = sandbox.admin_dir / "backup.service"
        mask.symlink_to("/dev/null")
        sandbox.daemon_reload()
        assert found(sandbox) == {
            ("shadowed", WEB, rel(sandbox, shadow)),
            ("masked", "backup.service", rel(sandbox, mask)),
        }

    def test_stale_load_after_editing_a_fragment(self, sandbox: Sandbox, restore: None) -> None:
        """Editing the fragment of a running unit without a reload is stale-load."""
        path = sandbox.config_dir / "extra-edit.service"
        path.write_text("[Service]\nExecStart=/bin/sleep infinity\n")
        sandbox.daemon_reload()
        sandbox.systemctl("start", "extra-edit.service")
        provenanced(sandbox, "baseline", "accept")
        try:
            path.write_text("[Service]\nExecStart=/bin/sleep 1000\n")
            assert (
                sandbox.show("extra-edit.service", "NeedDaemonReload")["NeedDaemonReload"] == "yes"
            )
            got = found(sandbox)
            assert ("stale-load", "extra-edit.service", rel(sandbox, path)) in got
        finally:
            sandbox.systemctl("stop", "extra-edit.service")
            path.unlink()
            sandbox.daemon_reload()
            provenanced(sandbox, "baseline", "accept")

    def test_load_error_from_broken_dropin(self, sandbox: Sandbox, restore: None) -> None:
        """A drop-in that breaks the unit gives load-error from the manager's own LoadState."""
        admin = sandbox.admin_dir / "backup.service.d/broken.conf"
        admin.parent.mkdir(parents=True)
        admin.write_text("[Service]\nType=bogus-type\nExecStart=\n")
        sandbox.daemon_reload()
        got = found(sandbox)
        assert (
            "load-error",
            "backup.service",
            rel(sandbox, sandbox.config_dir / "backup.service"),
        ) in got

    def test_foreign_owner_and_unsafe_mode(self, sandbox: Sandbox, restore: None) -> None:
        """A file owned by someone else, or writable by others, is flagged."""
        foreign = sandbox.config_dir / "extra-foreign.service"
        foreign.write_text("[Service]\nExecStart=/bin/true\n")
        os.chown(foreign, 65534, 65534)
        unsafe = sandbox.config_dir / "extra-unsafe.service"
        unsafe.write_text("[Service]\nExecStart=/bin/true\n")
        unsafe.chmod(0o666)
        kinds = {(f[0], f[1]) for f in found(sandbox)}
        assert ("foreign-owner", "extra-foreign.service") in kinds
        assert ("unsafe-mode", "extra-unsafe.service") in kinds

    def test_patterns_filter(self, sandbox: Sandbox, restore: None) -> None:
        """PATTERN arguments limit the audit to matching units."""
        (sandbox.config_dir / "extra-a.service").write_text("[Service]\nExecStart=/bin/true\n")
        code, document = audit_json(sandbox, "backup.*")
        assert code == 0 and document["findings"] == []


class TestShow:
    def test_show_agrees_with_systemctl(self, sandbox: Sandbox) -> None:
        """show's paths equal `systemctl --user show -p FragmentPath -p DropInPaths` for every unit."""
        listed = sandbox.systemctl("list-units", "--all", "--plain", "--no-legend", "--full").stdout
        units = [line.split()[0] for line in listed.splitlines() if line.strip()]
        result = provenanced(sandbox, "show", "--json", "--", *units)
        assert result.returncode == 0, result.stderr
        shown = {u["unit"]: u for u in json.loads(result.stdout)}
        assert set(shown) == set(units)
        for unit in units:
            out = sandbox.systemctl(
                "show", "-p", "FragmentPath", "-p", "DropInPaths", "--", unit
            ).stdout
            props = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
            fragment = shown[unit]["fragment"]
            assert (fragment["path"] if fragment else "") == props["FragmentPath"], unit
            assert [d["path"] for d in shown[unit]["dropins"]] == props["DropInPaths"].split(), unit

    def test_show_names_home_manager_as_owner(self, sandbox: Sandbox) -> None:
        """The managed fragment and drop-in are owned by Home Manager, with tier and target."""
        result = provenanced(sandbox, "show", "--json", WEB)
        (unit,) = json.loads(result.stdout)
        assert unit["fragment"]["owner"] == "home-manager"
        assert unit["fragment"]["tier"] == "config" and unit["fragment"]["kind"] == "symlink"
        assert "-home-manager-files/" in unit["fragment"]["target"]
        assert [d["owner"] for d in unit["dropins"]] == ["home-manager"]
        assert unit["load_state"] == "loaded" and unit["need_daemon_reload"] is False


class TestErrors:
    def test_unreachable_bus_exits_3_with_one_line(self, tmp_path: Path) -> None:
        """No manager anywhere: one line naming the address tried, exit 3."""
        env = {
            "PATH": os.environ["PATH"],
            "HOME": str(tmp_path),
            "XDG_RUNTIME_DIR": str(tmp_path / "run"),
        }
        result = subprocess.run(
            [sys.executable, "-m", "provenanced", "audit"],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert result.returncode == 3
        assert len(result.stderr.strip().splitlines()) == 1
        assert str(tmp_path / "run") in result.stderr

    def test_bad_config_exits_2(self, tmp_path: Path) -> None:
        """A config error is one line and exit 2, before any bus is touched."""
        config = tmp_path / "c.toml"
        config.write_text("[metrics]\nlisten = 'x'\n")
        result = subprocess.run(
            [sys.executable, "-m", "provenanced", "--config", str(config), "audit"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert result.returncode == 2
        assert result.stderr.count("\n") == 1 and "metrics.listen" in result.stderr

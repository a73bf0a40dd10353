"""Generated units and their sources against a real manager running a quadlet-like generator."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemonkit import Running, eventually, settings_for, start_daemon
from provenanced.config import ProvenanceSettings
from provenanced.model import FindingKind
from provenanced.sandbox import Sandbox, example_units
from provenanced.sandbox.quadlet import container_source

pytestmark = pytest.mark.integration

K = FindingKind
UNIT = "proxy.service"
SOURCE_REL = ".config/containers/systemd/proxy.container"
EDIT = container_source("docker.io/library/nginx:latest", publish="0.0.0.0:80:80")


def _boot(home_manager_source: bool) -> Iterator[Sandbox]:
    sandbox = Sandbox()
    try:
        files = example_units()
        if home_manager_source:
            files[SOURCE_REL] = container_source("docker.io/library/nginx:1.25")
        sandbox.install_home_manager(files)
        if not home_manager_source:
            sandbox.quadlet_dir.mkdir(parents=True)
            (sandbox.home / SOURCE_REL).write_text(container_source("docker.io/library/nginx:1.25"))
        sandbox.install_quadlet()
        sandbox.start()
        sandbox.systemctl("start", UNIT)
        yield sandbox
    finally:
        sandbox.stop()


@pytest.fixture
def linked_source() -> Iterator[Sandbox]:
    """Home Manager links the quadlet source into the store; the generator makes the unit."""
    yield from _boot(home_manager_source=True)


@pytest.fixture
def plain_source() -> Iterator[Sandbox]:
    """Plain quadlet: a regular source file in $XDG_CONFIG_HOME/containers/systemd."""
    yield from _boot(home_manager_source=False)


def _generated(sandbox: Sandbox) -> str:
    return (sandbox.runtime_dir / "systemd/generator" / UNIT).read_text()


def _reloads(running: Running) -> float:
    return running.sample(
        "provenanced_reloads_total", trigger="need-daemon-reload", result="ok"
    ) + running.sample("provenanced_reloads_total", trigger="content-hash", result="ok")


async def _edited_and_reloaded(
    sandbox: Sandbox, running: Running, source: Path, kind: FindingKind
) -> None:
    """The edit is reported; the auto-reload puts it live; the finding stays open after it."""
    assert running.findings() == set()
    await eventually(lambda: _reloads(running) >= 0)
    before = _reloads(running)
    if source.is_symlink():
        source.unlink()
    source.write_text(EDIT)
    await eventually(lambda: running.has(kind, source), what=f"{kind} on the source")
    await eventually(lambda: _reloads(running) > before, what="the automatic reload")
    await eventually(lambda: "nginx:latest" in _generated(sandbox), what="the generator re-ran")
    await eventually(lambda: not running.paths(K.STALE_LOAD), what="stale-load resolved")
    assert running.has(kind, source)


class TestGeneratedUnitSources:
    def test_the_sandbox_generator_names_the_source_as_found(self, linked_source: Sandbox) -> None:
        """The stand-in writes SourcePath= the path in HOME, not the store file it resolves to."""
        shown = linked_source.show(UNIT, "SourcePath", "FragmentPath")
        assert shown["SourcePath"] == str(linked_source.home / SOURCE_REL)
        assert shown["FragmentPath"] == str(linked_source.runtime_dir / "systemd/generator" / UNIT)

    def test_show_and_audit_name_the_source(self, linked_source: Sandbox) -> None:
        """``show`` has a source row owned by Home Manager; ``audit`` reports the replaced source."""
        source = linked_source.home / SOURCE_REL

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "provenanced", *args],
                env=linked_source.env,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )

        shown = json.loads(cli("show", "--json", UNIT).stdout)[0]["source"]
        assert (shown["path"], shown["owner"], shown["kind"]) == (
            str(source),
            "home-manager",
            "symlink",
        )
        table = cli("show", UNIT).stdout
        assert any(
            line.split()[:4] == ["source", "source", "symlink", "home-manager"]
            for line in table.splitlines()
        ), table
        source.unlink()
        source.write_text(EDIT)
        result = cli("audit", "--json", UNIT)
        found = {(f["kind"], f["path"]) for f in json.loads(result.stdout)["findings"]}
        assert result.returncode == 1
        assert ("link-replaced", str(source)) in found

    async def test_replaced_home_manager_source_link(self, linked_source: Sandbox) -> None:
        """A Home Manager source link replaced by an edited file: link-replaced, kept past the reload."""
        async with start_daemon(linked_source) as running:
            source = linked_source.home / SOURCE_REL
            await _edited_and_reloaded(linked_source, running, source, K.LINK_REPLACED)

    async def test_edited_plain_source(self, plain_source: Sandbox) -> None:
        """A plain source edited after the baseline: unmanaged-unit, kept past the reload."""
        async with start_daemon(plain_source) as running:
            source = plain_source.home / SOURCE_REL
            await _edited_and_reloaded(plain_source, running, source, K.UNMANAGED_UNIT)

    async def test_home_manager_podman_form_is_clean(self) -> None:
        """Home Manager's services.podman: the unit is a Home Manager link, its source a store file."""
        sandbox = Sandbox()
        try:
            store_source = sandbox.store / "hhhh-quadlet-proxy" / "hmproxy.container"
            store_source.parent.mkdir(parents=True)
            store_source.write_text(container_source("docker.io/library/nginx:1.25"))
            store_source.chmod(0o444)
            files = example_units()
            files[".config/systemd/user/hmproxy.service"] = (
                f"[Unit]\nSourcePath={store_source}\n\n"
                "[Service]\nType=oneshot\nRemainAfterExit=yes\nExecStart=/bin/true\n"
            )
            sandbox.install_home_manager(files)
            sandbox.start()
            sandbox.systemctl("start", "hmproxy.service")
            assert sandbox.show("hmproxy.service", "SourcePath")["SourcePath"] == str(store_source)
            settings = settings_for(sandbox)
            settings = settings.model_copy(
                update={"provenance": ProvenanceSettings(managed_roots=(str(sandbox.store),))}
            )
            async with start_daemon(sandbox, settings) as running:
                observation = running.engine.state.observation
                assert observation is not None
                assert observation.units["hmproxy.service"].source_path == str(store_source)
                assert running.findings() == set()
        finally:
            sandbox.stop()

    async def test_a_source_directory_created_later_is_watched(self, plain_source: Sandbox) -> None:
        """A quadlet directory that appears while the daemon runs is watched from then on."""
        runtime_dir = plain_source.runtime_dir / "containers/systemd"
        settings = settings_for(plain_source, need_daemon_reload="flag")
        settings = settings.model_copy(
            update={"provenance": ProvenanceSettings(managed_roots=(str(plain_source.store),))}
        )
        async with start_daemon(plain_source, settings) as running:
            runtime_dir.mkdir(parents=True)
            late = runtime_dir / "late.container"
            late.write_text(container_source("docker.io/library/redis:7"))
            plain_source.daemon_reload()
            plain_source.systemctl("start", "late.service")
            # New since the baseline, so nobody vouches for it.
            await eventually(lambda: running.has(K.UNMANAGED_UNIT, late))
            # Made a link into the store: vouched for, seen without any reload.
            store_file = plain_source.store / "ffff-late.container"
            store_file.write_text(late.read_text())
            os.utime(store_file, (1_000_000, 1_000_000))  # older: systemd sees nothing to reload
            tmp = runtime_dir / ".late.tmp"
            tmp.symlink_to(store_file)
            tmp.rename(late)
            await eventually(lambda: not running.has(K.UNMANAGED_UNIT, late))
            # And a regular file again, with no manager signal to prompt a look.
            late.unlink()
            late.write_text(EDIT)
            await eventually(lambda: running.has(K.UNMANAGED_UNIT, late))

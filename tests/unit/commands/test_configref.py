"""The generated configuration reference: up to date, complete, and true to the Settings model."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

import pytest

from provenanced.commands import configref
from provenanced.config import Settings, load_settings

ROOT = Path(__file__).resolve().parents[3]
_ASSIGNMENT = re.compile(r"^# (?P<name>[a-z_]+) = (?P<value>.*)$")

# A valid, non-default value per key: proves the documented environment variable reaches it.
SAMPLES: dict[str, tuple[str, object]] = {
    "state_dir": ("/srv/state", Path("/srv/state")),
    "manager.bus_address": ("unix:path=/run/x", "unix:path=/run/x"),
    "manager.call_timeout": ("3.5", 3.5),
    "manager.max_in_flight": ("8", 8),
    "manager.reconnect_max_delay": ("5", 5.0),
    "provenance.managed_roots": ('["/gnu/store"]', ("/gnu/store",)),
    "provenance.home_manager": ("false", False),
    "provenance.packages": ("none", "none"),
    "provenance.package_root": ("/srv/chroot/", "/srv/chroot"),
    "policy.need_daemon_reload": ("flag", "flag"),
    "policy.quiet_window": ("0.5", 0.5),
    "policy.defer_while_active": ('["x-*.service"]', ("x-*.service",)),
    "policy.max_reloads_per_hour": ("1", 1),
    "policy.activation_timeout": ("30", 30.0),
    "policy.heal": ('{"link-replaced": "heal"}', {"link-replaced": "heal"}),
    "policy.resync_interval": ("60", 60.0),
    "policy.degraded_resync_interval": ("5", 5.0),
    "policy.alert_min_interval": ("0", 0.0),
    "metrics.listen": ("127.0.0.1:1", "127.0.0.1:1"),
    "metrics.tls.cert_file": ("/c.pem", Path("/c.pem")),
    "metrics.tls.key_file": ("/k.pem", Path("/k.pem")),
    "metrics.tls.client_ca_file": ("/ca.pem", Path("/ca.pem")),
    "log.level": ("debug", "debug"),
    "log.format": ("json", "json"),
    "scope": ("host", "host"),
    "host.runtime_root": ("/srv/run/user", "/srv/run/user"),
    "host.state_root": ("/srv/lib/provenanced", "/srv/lib/provenanced"),
    "host.allow_users": ('["alice"]', ("alice",)),
    "host.deny_users": ('["mallory"]', ("mallory",)),
}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The caller's PROVENANCED_* variables must not leak into the defaults under test."""
    for key in list(os.environ):
        if key.startswith("PROVENANCED_"):
            monkeypatch.delenv(key)


def _value_at(settings: Settings, dotted: str) -> object:
    value: object = settings
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


class TestCheckout:
    """The files in the repository are what the model generates now."""

    def test_readme_table_is_current(self) -> None:
        """README's table between the markers equals the generated one."""
        readme = (ROOT / configref.README).read_text()
        assert configref.splice_table(readme, configref.render_table()) == readme, (
            "README.md's configuration table is stale: python -m provenanced.commands.configref --write"
        )

    def test_example_file_is_current(self) -> None:
        """config/provenanced.example.toml equals the generated example."""
        assert (ROOT / configref.EXAMPLE).read_text() == configref.render_example(), (
            "the example config is stale: python -m provenanced.commands.configref --write"
        )

    def test_check_mode_agrees(self) -> None:
        """``--check`` exits 0 on the checkout."""
        assert configref.main(["--check", "--root", str(ROOT)]) == 0


class TestExample:
    """The example is a valid config that documents every key at its real default."""

    def test_loads_as_defaults(self, tmp_path: Path) -> None:
        """As shipped (everything commented out) it gives the default settings."""
        path = tmp_path / "config.toml"
        path.write_text(configref.render_example())
        assert load_settings(path, {}) == Settings.model_validate({})

    def test_every_shown_default_is_the_default(self, tmp_path: Path) -> None:
        """Uncommenting every key that has a default still gives the default settings."""
        lines = []
        for line in configref.render_example().splitlines():
            match = _ASSIGNMENT.match(line)
            if match and match["value"] != "(unset)":
                line = f"{match['name']} = {match['value']}"
            lines.append(line)
        path = tmp_path / "config.toml"
        path.write_text("\n".join(lines))
        assert load_settings(path, {}) == Settings.model_validate({})

    def test_every_key_is_documented(self) -> None:
        """Each leaf key is assigned once in its section of the example and has one table row."""
        assigned, section = [], ""
        for line in configref.render_example().splitlines():
            if line.startswith("["):
                section = line.strip("[]") + "."
            elif match := _ASSIGNMENT.match(line):
                assigned.append(section + match["name"])
        dotted = [key.dotted for key in configref.leaf_keys()]
        assert assigned == dotted
        table = configref.render_table()
        assert all(table.count(f"| `{name}` |") == 1 for name in dotted)


class TestEnvironmentNames:
    """The environment column names variables that really override each key."""

    def test_samples_cover_every_key(self) -> None:
        """A new setting needs a sample here, so its documented variable gets tested."""
        assert {key.dotted for key in configref.leaf_keys()} == set(SAMPLES)

    @pytest.mark.parametrize("dotted", sorted(SAMPLES))
    def test_variable_overrides_key(self, dotted: str, monkeypatch: pytest.MonkeyPatch) -> None:
        """Setting the documented variable changes exactly that key."""
        key = next(k for k in configref.leaf_keys() if k.dotted == dotted)
        raw, expected = SAMPLES[dotted]
        monkeypatch.setenv(key.env, raw)
        value = _value_at(load_settings(None, {"HOME": "/nonexistent"}), dotted)
        if isinstance(value, dict):
            value = {str(k): v for k, v in value.items()}
        assert value == expected


class TestRendering:
    """Types, defaults and the splice read the way a person expects."""

    @pytest.mark.parametrize(
        ("annotation", "text"),
        [
            (float, "float"),
            (Path | None, "path (optional)"),
            (tuple[str, ...], "list of strings"),
            (Literal["a", "b"], '"a" | "b"'),
            (dict[str, bool], "table: string → boolean"),
        ],
    )
    def test_describe_type(self, annotation: object, text: str) -> None:
        """Annotations become short readable names."""
        assert configref.type_name(annotation) == text

    @pytest.mark.parametrize(
        ("value", "text"),
        [(True, "true"), (2.0, "2.0"), (("/a", "/b"), '["/a", "/b"]'), ({}, "{}"), ("x", '"x"')],
    )
    def test_toml_value(self, value: object, text: str) -> None:
        """Defaults render as TOML source."""
        assert configref.toml_value(value) == text

    def test_table_cells_escape_pipes(self) -> None:
        """A Literal's ``|`` does not split the Markdown cell."""
        row = next(r for r in configref.render_table().splitlines() if "`log.level`" in r)
        assert '"debug" \\| "info"' in row

    def test_splice_keeps_the_rest(self) -> None:
        """Only the text between the markers changes."""
        readme = f"intro\n{configref.TABLE_START}\nold\n{configref.TABLE_END}\noutro\n"
        spliced = configref.splice_table(readme, "new\n")
        assert spliced == f"intro\n{configref.TABLE_START}\nnew\n{configref.TABLE_END}\noutro\n"

    def test_splice_without_markers_fails(self) -> None:
        """A README that lost its markers is an error, not a silent append."""
        with pytest.raises(ValueError, match="markers"):
            configref.splice_table("no markers here\n", "table\n")

    def test_write_then_check(self, tmp_path: Path) -> None:
        """``--write`` on a stale checkout makes ``--check`` pass."""
        (tmp_path / "README.md").write_text(f"{configref.TABLE_START}\n{configref.TABLE_END}\n")
        assert configref.main(["--check", "--root", str(tmp_path)]) == 1
        assert configref.main(["--write", "--root", str(tmp_path)]) == 0
        assert configref.main(["--check", "--root", str(tmp_path)]) == 0

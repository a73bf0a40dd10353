"""Configuration: TOML plus environment, with one clear error per problem."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from provenanced.config import load_settings
from provenanced.errors import ConfigError


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("PROVENANCED_"):
            monkeypatch.delenv(key)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


class TestLoadSettings:
    def test_defaults_without_file(self, tmp_path: Path) -> None:
        """No config file at the default place means defaults."""
        settings = load_settings(None, {"HOME": str(tmp_path)})
        assert settings.metrics.listen == "127.0.0.1:10055"
        assert settings.provenance.managed_roots == ("/nix/store",)
        assert settings.policy.need_daemon_reload == "reload"
        assert settings.resolved_state_dir({"HOME": "/h"}) == "/h/.local/state/provenanced"

    def test_explicit_missing_file_is_an_error(self, tmp_path: Path) -> None:
        """An explicit --config that does not exist is not silently skipped."""
        with pytest.raises(ConfigError, match="does not exist"):
            load_settings(tmp_path / "nope.toml")

    def test_env_overrides_toml(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """PROVENANCED_<SECTION>__<KEY> wins over the file, and other keys of the section stay."""
        path = write(tmp_path, '[metrics]\nlisten = "127.0.0.1:9999"\n[policy]\nquiet_window = 5\n')
        monkeypatch.setenv("PROVENANCED_PROVENANCE__MANAGED_ROOTS", '["/gnu/store", "/nix/store"]')
        monkeypatch.setenv("PROVENANCED_POLICY__MAX_RELOADS_PER_HOUR", "3")
        monkeypatch.setenv("PROVENANCED_STATE_DIR", "/tmp/state")
        settings = load_settings(path)
        assert settings.metrics.listen == "127.0.0.1:9999"
        assert settings.provenance.managed_roots == ("/gnu/store", "/nix/store")
        assert (settings.policy.quiet_window, settings.policy.max_reloads_per_hour) == (5, 3)
        assert settings.resolved_state_dir({}) == "/tmp/state"

    @pytest.mark.parametrize(
        ("text", "message"),
        [
            ("[metrics]\nlisten = 'nope'\n", "metrics.listen: 'nope' is not host:port"),
            ("[policy]\nneed_daemon_reload = 'always'\n", "policy.need_daemon_reload"),
            ("[policy.heal]\nunsafe-mode = 'heal'\n", "unsafe-mode cannot be healed"),
            ("[provenance]\nmanaged_roots = ['relative']\n", "not an absolute path"),
            ("[metrics]\nlisten_on = '1'\n", "metrics.listen_on: unknown key"),
            ("[metrics\n", "invalid TOML"),
        ],
    )
    def test_errors_name_the_key(self, tmp_path: Path, text: str, message: str) -> None:
        """Every invalid value yields one line that names the key."""
        with pytest.raises(ConfigError) as info:
            load_settings(write(tmp_path, text))
        assert message in str(info.value)
        assert "\n" not in str(info.value)

    @given(st.text(max_size=200))
    def test_arbitrary_text_never_crashes(self, text: str) -> None:
        """Any file content yields settings or a ConfigError, nothing else."""
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "c.toml"
            path.write_text(text, encoding="utf-8", errors="surrogateescape")
            try:
                load_settings(path)
            except ConfigError as exc:
                message = str(exc)
            else:
                message = ""
            assert "\n" not in message

    @given(
        st.sampled_from(
            [
                "PROVENANCED_POLICY__HEAL",
                "PROVENANCED_PROVENANCE__MANAGED_ROOTS",
                "PROVENANCED_POLICY",
                "PROVENANCED_MANAGER__CALL_TIMEOUT",
            ]
        ),
        st.one_of(
            st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")),
            st.integers(1, 5000).map(lambda depth: "[" * depth + "]" * depth),
        ),
    )
    def test_arbitrary_environment_never_crashes(self, name: str, value: str) -> None:
        """Any environment value yields settings or a one-line ConfigError, nothing else."""
        import os
        import tempfile
        from unittest import mock

        with tempfile.TemporaryDirectory() as tmp, mock.patch.dict(os.environ, {name: value}):
            path = Path(tmp) / "c.toml"
            path.write_text("")
            try:
                load_settings(path)
            except ConfigError as exc:
                message = str(exc)
            else:
                message = ""
            assert "\n" not in message

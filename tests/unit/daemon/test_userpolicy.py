"""A user's policy file in host mode: only [policy], valid, and within the user's bounds."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from provenanced.config import MAX_CONFIG_BYTES, PolicySettings
from provenanced.daemon.userpolicy import (
    AT_LEAST_HOST,
    AT_MOST_HOST,
    MAX_DEFER_PATTERNS,
    policy_path,
    read_policy_file,
    user_policy,
)
from provenanced.errors import ConfigError
from provenanced.model import FindingKind

HOST = PolicySettings(quiet_window=2.0, heal={FindingKind.LINK_REPLACED: "heal"})
SOURCE = "alice: /home/alice/.config/provenanced/policy.toml"


class TestUserPolicy:
    def test_no_file_is_the_host_policy(self) -> None:
        """Without a file the user runs with the host's policy, nothing overridden."""
        found = user_policy(None, HOST, SOURCE)
        assert (found.policy, found.overridden, found.clamped) == (HOST, (), ())

    def test_the_files_keys_override_the_host_and_only_those(self) -> None:
        """need_daemon_reload = flag: that key changes, every other key is the host's."""
        found = user_policy({"policy": {"need_daemon_reload": "flag"}}, HOST, SOURCE)
        assert found.policy == HOST.model_copy(update={"need_daemon_reload": "flag"})
        assert (found.overridden, found.clamped) == (("need_daemon_reload",), ())

    def test_an_empty_file_changes_nothing(self) -> None:
        """An empty file (or an empty [policy]) is the host's policy."""
        assert user_policy({}, HOST, SOURCE).policy == HOST
        assert user_policy({"policy": {}}, HOST, SOURCE).policy == HOST

    def test_heal_modes_merge_per_kind(self) -> None:
        """A kind the file names takes its mode; the host's other kinds keep theirs."""
        data = {"policy": {"heal": {"link-dangling": "heal"}}}
        heal = user_policy(data, HOST, SOURCE).policy.heal
        assert heal == {FindingKind.LINK_REPLACED: "heal", FindingKind.LINK_DANGLING: "heal"}
        data = {"policy": {"heal": {"link-replaced": "flag"}}}
        assert user_policy(data, HOST, SOURCE).policy.heal == {FindingKind.LINK_REPLACED: "flag"}

    @pytest.mark.parametrize("key", AT_LEAST_HOST)
    def test_pacing_intervals_may_only_grow(self, key: str) -> None:
        """A shorter interval than the host's is clamped to it; a longer one is taken."""
        host_value = getattr(HOST, key)
        shorter = user_policy({"policy": {key: host_value / 2}}, HOST, SOURCE)
        assert getattr(shorter.policy, key) == host_value
        assert (shorter.overridden, shorter.clamped) == ((), (key,))
        longer = user_policy({"policy": {key: host_value * 2 + 1}}, HOST, SOURCE)
        assert getattr(longer.policy, key) == host_value * 2 + 1
        assert (longer.overridden, longer.clamped) == ((key,), ())

    @pytest.mark.parametrize("key", AT_MOST_HOST)
    def test_reload_budget_and_activation_hold_may_only_shrink(self, key: str) -> None:
        """More reloads an hour or a longer activation hold than the host's is clamped."""
        host_value = getattr(HOST, key)
        more = user_policy({"policy": {key: host_value * 100}}, HOST, SOURCE)
        assert getattr(more.policy, key) == host_value
        assert more.clamped == (key,)
        less = user_policy({"policy": {key: host_value // 2}}, HOST, SOURCE)
        assert getattr(less.policy, key) == host_value // 2
        assert less.overridden == (key,)

    def test_too_many_defer_patterns_keep_the_hosts(self) -> None:
        """Every pattern is matched against every unit per deferred reload: the count is capped."""
        many = [f"unit-{n}.service" for n in range(MAX_DEFER_PATTERNS + 1)]
        found = user_policy({"policy": {"defer_while_active": many}}, HOST, SOURCE)
        assert found.policy.defer_while_active == HOST.defer_while_active
        assert found.clamped == ("defer_while_active",)
        few = many[:MAX_DEFER_PATTERNS]
        assert user_policy({"policy": {"defer_while_active": few}}, HOST, SOURCE).overridden == (
            "defer_while_active",
        )

    def test_a_clamped_key_does_not_spoil_the_others(self) -> None:
        """One key beyond its bound keeps the host's value; the file's other keys still apply."""
        data = {"policy": {"resync_interval": 0.01, "need_daemon_reload": "ignore"}}
        found = user_policy(data, HOST, SOURCE)
        assert found.policy.need_daemon_reload == "ignore"
        assert found.policy.resync_interval == HOST.resync_interval

    @pytest.mark.parametrize(
        ("data", "message"),
        [
            ({"metrics": {"listen": "0.0.0.0:80"}}, "metrics: unknown key"),
            ({"policy": {"bogus": 1}}, "policy.bogus: unknown key"),
            ({"policy": {"resync_interval": "soon"}}, "policy.resync_interval"),
            ({"policy": {"need_daemon_reload": "always"}}, "policy.need_daemon_reload"),
            ({"policy": {"heal": {"unsafe-mode": "heal"}}}, "unsafe-mode cannot be healed"),
            ({"policy": "flag"}, "policy"),
        ],
    )
    def test_anything_but_a_valid_policy_table_is_refused(
        self, data: dict[str, Any], message: str
    ) -> None:
        """A key outside [policy] or an invalid value: a ConfigError naming the file and the key."""
        with pytest.raises(ConfigError) as caught:
            user_policy(data, HOST, SOURCE)
        assert str(caught.value).startswith(f"{SOURCE}: ")
        assert message in str(caught.value)


class TestReadPolicyFile:
    def test_the_path_is_fixed_under_the_home(self) -> None:
        """~/.config/provenanced/policy.toml of the home the user database gives."""
        assert policy_path("/home/alice") == "/home/alice/.config/provenanced/policy.toml"

    def test_a_missing_file_is_none(self, tmp_path: Path) -> None:
        """No file (or no directory) is not an error: the host's policy applies."""
        assert read_policy_file(str(tmp_path / "missing/policy.toml")) is None

    def test_a_table_is_read(self, tmp_path: Path) -> None:
        """The file's TOML, as a table."""
        path = tmp_path / "policy.toml"
        path.write_text('[policy]\nneed_daemon_reload = "flag"\n')
        assert read_policy_file(str(path)) == {"policy": {"need_daemon_reload": "flag"}}

    def test_a_fifo_is_refused_without_waiting(self, tmp_path: Path) -> None:
        """A FIFO nobody writes to is refused before it is opened for reading."""
        path = tmp_path / "policy.toml"
        os.mkfifo(path)
        with pytest.raises(ConfigError, match="not a regular file"):
            read_policy_file(str(path))

    @pytest.mark.parametrize(
        ("content", "message"),
        [
            (b"x" * (MAX_CONFIG_BYTES + 1), "larger than"),
            (b"[policy\n", "invalid TOML"),
            (b"\xff\xfe", "not UTF-8"),
        ],
    )
    def test_unusable_content_is_refused(
        self, tmp_path: Path, content: bytes, message: str
    ) -> None:
        """Too large, not TOML, not UTF-8: a ConfigError naming the file."""
        path = tmp_path / "policy.toml"
        path.write_bytes(content)
        with pytest.raises(ConfigError, match=message) as caught:
            read_policy_file(str(path))
        assert str(path) in str(caught.value)

"""Whether a Home Manager activation is under way, from its roots, its links and its units."""

from __future__ import annotations

import pytest

from provenanced.core.switching import (
    CLEANUP_SUSPECTED,
    ActivationFacts,
    Root,
    activation_reason,
)
from provenanced.model import UnitRecord

OLD, NEW = "/nix/store/a-home-manager-generation", "/nix/store/b-home-manager-generation"
OLD_FILES = "/nix/store/a-home-manager-files"
SETTLED = ActivationFacts(
    current_home=Root(OLD, 200),
    followed_generation=OLD,
    profile=Root(OLD, 100),
    linked_home_files=frozenset({OLD_FILES}),
)


class TestActivationReason:
    def test_a_settled_home_is_no_activation(self) -> None:
        """current-home, the profile and the links agree: nothing runs."""
        assert activation_reason(SETTLED) is None

    @pytest.mark.parametrize(
        ("facts", "says"),
        [
            pytest.param(
                ActivationFacts(
                    current_home=Root(OLD, 200), followed_generation=OLD, new_home=Root(NEW, 300)
                ),
                "new-home",
                id="new-home",
            ),
            pytest.param(
                ActivationFacts(
                    current_home=Root(OLD, 200), followed_generation=OLD, profile=Root(NEW, 300)
                ),
                "profile",
                id="profile-ahead",
            ),
            pytest.param(
                ActivationFacts(current_home=Root(NEW, 300), followed_generation=OLD),
                "not read yet",
                id="current-home-not-read",
            ),
            pytest.param(
                ActivationFacts(
                    current_home=Root(NEW, 300),
                    followed_generation=NEW,
                    previous_home_files=OLD_FILES,
                    linked_home_files=frozenset({OLD_FILES}),
                ),
                "previous generation",
                id="links-into-previous",
            ),
            pytest.param(
                ActivationFacts(
                    current_home=Root(NEW, 300),
                    followed_generation=NEW,
                    stale_load_open=True,
                    reloaded_since_generation_changed=False,
                ),
                "daemon-reload",
                id="awaiting-reload",
            ),
            pytest.param(
                ActivationFacts(
                    units=(UnitRecord("home-manager.service", active_state="activating"),)
                ),
                "home-manager.service is activating",
                id="user-unit",
            ),
            pytest.param(
                ActivationFacts(
                    units=(UnitRecord("home-manager-auto-upgrade.service", active_state="active"),)
                ),
                "home-manager-auto-upgrade.service is active",
                id="auto-upgrade-unit",
            ),
            pytest.param(ActivationFacts(cleanup_suspected=True), CLEANUP_SUSPECTED, id="cleanup"),
        ],
    )
    def test_each_sign_of_an_activation(self, facts: ActivationFacts, says: str) -> None:
        """Each sign alone says an activation runs, and which sign it was."""
        reason = activation_reason(facts)
        assert reason is not None and says in reason

    def test_an_older_profile_is_not_ahead(self) -> None:
        """A profile nobody switches through (the NixOS module) older than current-home holds nothing."""
        facts = ActivationFacts(
            current_home=Root(NEW, 300), followed_generation=NEW, profile=Root(OLD, 100)
        )
        assert activation_reason(facts) is None

    def test_a_finished_user_unit_is_no_activation(self) -> None:
        """The oneshot user unit stays active after its run (RemainAfterExit=yes)."""
        unit = UnitRecord("home-manager.service", active_state="active")
        assert activation_reason(ActivationFacts(units=(unit,))) is None

    def test_new_home_equal_to_current_home_is_the_exit_trap_pending(self) -> None:
        """current-home already moved onto new-home's generation: the activation's work is done."""
        facts = ActivationFacts(
            current_home=Root(NEW, 300), followed_generation=NEW, new_home=Root(NEW, 250)
        )
        assert activation_reason(facts) is None

    def test_a_stale_load_after_a_reload_is_real(self) -> None:
        """Once the manager reloaded after the generation changed, a stale load is drift."""
        facts = ActivationFacts(stale_load_open=True, reloaded_since_generation_changed=True)
        assert activation_reason(facts) is None

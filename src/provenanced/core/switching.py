"""Whether a Home Manager switch is under way, judged from plain facts about its roots.

An activation relinks every file, has the manager stop, reload and start units, and moves
``gcroots/current-home`` (modules/home-environment.nix and modules/files.nix of
nix-community/home-manager). Until it ends, what the unit directories hold is half one
generation, half the next: nothing in them is drift yet.
"""

from __future__ import annotations

from dataclasses import dataclass

from provenanced.model import UnitRecord

# The user units a switch runs in, and the states they are in while it runs: NixOS'
# startAsUserService unit is Type=oneshot with RemainAfterExit=yes ("active" once done);
# services.home-manager.autoUpgrade's is Type=simple ("active" while it runs).
ACTIVATION_UNITS = {
    "home-manager.service": frozenset({"activating"}),
    "home-manager-auto-upgrade.service": frozenset({"activating", "active"}),
}


CLEANUP_SUSPECTED = "a Home Manager link went away; an activation's cleanup may have begun"


@dataclass(frozen=True, slots=True)
class Root:
    """One link of Home Manager's (a gcroot or the profile): where it leads, and when it moved."""

    resolved: str | None = None  # None: absent, or leading nowhere
    changed_ns: int = 0  # the link's own mtime: when it was last replaced


@dataclass(frozen=True, slots=True)
class ActivationFacts:
    """What tells an activation is running, read fresh at each look."""

    current_home: Root = Root()
    followed_generation: str | None = None  # the generation the daemon judges against
    new_home: Root = Root()
    profile: Root = Root()
    # The generation the daemon followed before ``current_home`` last moved (its home-files).
    previous_home_files: str | None = None
    linked_home_files: frozenset[str] = frozenset()  # the home-files unit directories link into
    stale_load_open: bool = False
    reloaded_since_generation_changed: bool = True
    units: tuple[UnitRecord, ...] = ()
    # A link the current generation expects just went away: up to release 24.11 the cleanup
    # removes links before anything else on disk tells that an activation started.
    cleanup_suspected: bool = False


def activation_reason(facts: ActivationFacts) -> str | None:
    """Why an activation is in progress, or None when none is."""
    current = facts.current_home
    if facts.new_home.resolved is not None and facts.new_home.resolved != current.resolved:
        return "gcroots/new-home leads to a generation current-home does not"
    if facts.followed_generation is not None and current.resolved not in (
        None,
        facts.followed_generation,
    ):
        return "current-home moved to a generation not read yet"
    profile = facts.profile
    if (
        profile.resolved is not None
        and profile.resolved != current.resolved
        and profile.changed_ns > current.changed_ns
    ):
        # Older than current-home it is a profile nobody switches through (the NixOS module).
        return "the home-manager profile moved past current-home"
    if (
        facts.previous_home_files is not None
        and facts.previous_home_files in facts.linked_home_files
    ):
        # Up to release 24.11 current-home moves between the cleanup and the linking.
        return "unit directories still link into the previous generation"
    if facts.stale_load_open and not facts.reloaded_since_generation_changed:
        return "the new generation's units wait for the activation's daemon-reload"
    for unit in sorted(facts.units, key=lambda u: u.name):
        if unit.active_state in ACTIVATION_UNITS.get(unit.name, ()):
            return f"{unit.name} is {unit.active_state}"
    if facts.cleanup_suspected:
        return CLEANUP_SUSPECTED
    return None

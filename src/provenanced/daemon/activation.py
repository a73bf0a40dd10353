"""Home Manager activations followed: hold alerts, reloads and heals while one runs.

While an activation runs, the state keeps following the disk, but nothing is sent: the
published findings stay as they were before it began. When it ends, the findings published
before it are diffed against the state's, and only what remains is reported. One that never
ends is judged after ``policy.activation_timeout``.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass

import structlog

from provenanced.core.state import AuditState
from provenanced.core.switching import (
    ACTIVATION_UNITS,
    CLEANUP_SUSPECTED,
    ActivationFacts,
    Root,
    activation_reason,
)
from provenanced.core.transitions import Key, diff
from provenanced.core.vouching import home_manager_files_dir
from provenanced.model import FileKind, Finding, FindingKind, Transition

log = structlog.get_logger("provenanced.activation")

# How long a vanished Home Manager link holds on its own, waiting for the profile to move.
CLEANUP_GRACE = 1.0

GCROOTS = ".local/state/home-manager/gcroots"
# `nix-env --profile`'s link (home-manager/home-manager, release-25.11: profiles in XDG state).
PROFILE = ".local/state/nix/profiles/home-manager"


@dataclass(frozen=True, slots=True)
class Verdict:
    """What one look decided: hold everything back, or send these transitions."""

    holding: bool
    transitions: list[Transition]


@dataclass(frozen=True, slots=True)
class Roots:
    """Home Manager's links as read for one look: the two gcroots and the profile."""

    current_home: Root
    new_home: Root
    profile: Root


def _root(path: str) -> Root:
    """Where a Home Manager link leads and when it was last replaced; absent: an empty Root."""
    try:
        changed = os.lstat(path).st_mtime_ns
        return Root(os.path.realpath(path, strict=True), changed)
    except OSError:
        return Root()


class Activation:
    """One user's Home Manager activations, as seen from its roots and its unit directories."""

    def __init__(self, home: str, timeout: float) -> None:
        self.timeout = timeout
        self.gcroots_dir = posixpath.join(home, GCROOTS)
        self.profile = posixpath.join(home, PROFILE)
        self.reason: str | None = None
        self.stuck = False
        self._since: float | None = None  # when the hold began (monotonic); None: not holding
        self._before: dict[Key, Finding] = {}  # the findings published when it began
        self._followed: str | None = None  # the home-files the state followed at the last look
        self._previous: str | None = None  # the home-files before the generation last changed
        self._reloaded = True  # the manager reloaded since the generation last changed
        self._cleanup_until = 0.0  # a vanished managed link holds until then (monotonic)

    @property
    def profile_dir(self) -> str:
        """The directory holding the profile link: watched, since the CLI moves it first."""
        return posixpath.dirname(self.profile)

    @property
    def holding(self) -> bool:
        """Whether findings, reloads and heals are held back right now."""
        return self._since is not None

    def read_roots(self) -> Roots:
        """Where the gcroots and the profile lead now; blocking I/O, for the engine's executor.

        They resolve into the store: on a mount that hangs, this hangs too, never the loop.
        """
        return Roots(
            current_home=_root(posixpath.join(self.gcroots_dir, "current-home")),
            new_home=_root(posixpath.join(self.gcroots_dir, "new-home")),
            profile=_root(self.profile),
        )

    def published(self, current: Mapping[Key, Finding]) -> tuple[Finding, ...]:
        """The findings to publish: as before the activation while holding, else ``current``."""
        return tuple((self._before if self.holding else current).values())

    def follow(self, state: AuditState, manager_reloaded: bool) -> None:
        """Note a new generation in the state, and a reload of the manager."""
        files = state.generation.home_files
        if files != self._followed:
            if self._followed is not None:
                self._previous, self._reloaded = self._followed, False
            self._followed = files
        if manager_reloaded:
            self._reloaded = True

    def look(
        self,
        state: AuditState,
        published: tuple[Finding, ...],
        transitions: list[Transition],
        now: float,
        roots: Roots,
    ) -> Verdict:
        """Decide whether to hold; ``transitions`` are the update's, ``published`` what is out,
        ``roots`` what ``read_roots`` just found."""
        self.follow(state, False)
        if self._since is None and any(_managed_link_gone(t, state) for t in transitions):
            self._cleanup_until = now + CLEANUP_GRACE
        self.reason = activation_reason(self._facts(state, roots, now < self._cleanup_until))
        if self.reason is None:
            self.stuck = False
        if self._since is None:
            if self.reason is None or self.stuck:
                return Verdict(False, transitions)
            self._since, self._before = now, {f.key: f for f in published}
            log.info("homemanager.activation_started", reason=self.reason)
            return Verdict(True, [])
        if self.reason is not None and now - self._since < self.timeout:
            return Verdict(True, [])
        if self.reason is not None and self.reason != CLEANUP_SUSPECTED:
            self.stuck = True
            log.warning(
                "homemanager.activation_stuck",
                reason=self.reason,
                seconds=round(now - self._since, 1),
            )
        else:
            log.info("homemanager.activation_ended", seconds=round(now - self._since, 3))
            self._previous, self._reloaded, self._cleanup_until = None, True, 0.0
        before, self._since, self._before = self._before, None, {}
        return Verdict(False, diff(before, state.findings.values(), now)[1])

    def unit_signal(self) -> str | None:
        """The activation unit the hold rests on, if that is all it rests on: re-read it."""
        reason = self.reason or ""
        return (
            reason.partition(" is ")[0]
            if reason.endswith((" is active", " is activating"))
            else None
        )

    def _facts(self, state: AuditState, roots: Roots, cleanup_suspected: bool) -> ActivationFacts:
        obs = state.observation
        linked: frozenset[str] = frozenset()
        if self._previous is not None and obs is not None:
            linked = frozenset(
                hm
                for fact in obs.facts.values()
                if fact.kind is FileKind.SYMLINK and (hm := home_manager_files_dir(fact.target))
            )
        return ActivationFacts(
            current_home=roots.current_home,
            followed_generation=state.generation.path,
            new_home=roots.new_home,
            profile=roots.profile,
            previous_home_files=self._previous,
            linked_home_files=linked,
            stale_load_open=state.has_open(FindingKind.STALE_LOAD),
            reloaded_since_generation_changed=self._reloaded,
            # Only the units a switch runs in: a look costs the same at 100 units and at 10,000.
            units=tuple(
                unit
                for name in ACTIVATION_UNITS
                if obs is not None and (unit := obs.units.get(name)) is not None
            ),
            cleanup_suspected=cleanup_suspected,
        )


def _managed_link_gone(transition: Transition, state: AuditState) -> bool:
    finding = transition.finding
    return (
        transition.state == "detected"
        and finding.kind is FindingKind.MANAGED_MISSING
        and finding.path in state.expectations.home_manager_links
    )

"""A user's own policy in host mode: ``~/.config/provenanced/policy.toml`` over the host's.

The file is the user's, so it is read on the user's thread (``fs/fsuid.py``), never as root: a
link to ``/etc/shadow`` reads as "Permission denied". It holds only a ``[policy]`` table. What
it may change is bounded: the root daemon is shared by every user, so a user may change what is
done to their own units (reload or flag, heal or flag, which units defer a reload) and may make
the daemon work for them less often, never more often than the host's policy lets it.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from provenanced.config import PolicySettings, read_toml_file, validate_policy_file

# Under the home the user database gives: the daemon never sees the user's login environment,
# so $XDG_CONFIG_HOME cannot be honoured (a link from here to a file there works).
POLICY_FILE = ".config/provenanced/policy.toml"
# Keys a user may only raise above the host's value: each paces work the root daemon does
# (resyncs, alerts into the system journal, the wait before acting on a burst of changes).
AT_LEAST_HOST = (
    "quiet_window",
    "resync_interval",
    "degraded_resync_interval",
    "alert_min_interval",
)
# Keys a user may only lower: reloads are followed by a full resync of the daemon's, and an
# activation held longer keeps findings from the host's view (and is looked at twice a second).
AT_MOST_HOST = ("max_reloads_per_hour", "activation_timeout")
# Each pattern is matched against every unit each time a deferred reload is tried again.
MAX_DEFER_PATTERNS = 32


@dataclass(frozen=True, slots=True)
class UserPolicy:
    """The policy one user's engine runs with, and how it came from the user's file."""

    policy: PolicySettings
    overridden: tuple[str, ...] = ()  # keys the file set and the daemon took
    clamped: tuple[str, ...] = ()  # keys the file set beyond its bounds: the host's value stays


def policy_path(home: str) -> str:
    """Where ``home``'s user keeps their policy file."""
    return posixpath.join(home, POLICY_FILE)


def read_policy_file(path: str) -> dict[str, Any] | None:
    """The file's TOML table, None when there is none; ConfigError when it cannot be used.

    Runs on the user's thread: the kernel checks the open against the user, a symlink included.
    """
    try:
        return read_toml_file(Path(path))
    except FileNotFoundError:
        return None


def user_policy(data: dict[str, Any] | None, host: PolicySettings, source: str) -> UserPolicy:
    """``host`` with the file's keys applied within their bounds; ConfigError when invalid."""
    if data is None:
        return UserPolicy(host)
    parsed = validate_policy_file(data, source)
    wanted = {key: getattr(parsed, key) for key in parsed.model_fields_set}
    if "heal" in wanted:
        # Kinds the file does not name keep the host's mode.
        wanted["heal"] = {**host.heal, **wanted["heal"]}
    clamped = sorted(key for key, value in wanted.items() if not _within_bounds(key, value, host))
    taken = {key: value for key, value in wanted.items() if key not in clamped}
    return UserPolicy(host.model_copy(update=taken), tuple(sorted(taken)), tuple(clamped))


def _within_bounds(key: str, value: Any, host: PolicySettings) -> bool:
    if key in AT_LEAST_HOST:
        return bool(value >= getattr(host, key))
    if key in AT_MOST_HOST:
        return bool(value <= getattr(host, key))
    if key == "defer_while_active":
        return len(value) <= MAX_DEFER_PATTERNS
    return True

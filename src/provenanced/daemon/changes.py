"""What can make the daemon look again, and which look each manager signal or file event asks for."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

from provenanced.core.sources import is_vendor_source, quadlet_source_dirs
from provenanced.core.unitpath import UserDirs
from provenanced.daemon.activation import PROFILE
from provenanced.expect import baseline
from provenanced.expect.generation import GCROOT
from provenanced.expect.packages import PackageDatabase
from provenanced.fs.watch import Overflow, PathChanged, WatchEvent, WatchLimitReached
from provenanced.systemd import events


@dataclass(frozen=True, slots=True)
class FullResync:
    """Re-read everything: start-up, reconnect, overflow, reload, a new generation, the backstop."""

    reason: str
    monotonic: float
    manager_reloaded: bool = False  # the manager just (re)loaded: retake the definition hashes


@dataclass(frozen=True, slots=True)
class UnitChanged:
    """The manager loaded a unit (re-read it) or unloaded it (forget it, never re-read it).

    Reading an unloaded unit by its object path would load it again, and the manager would
    unload it again: a loop of D-Bus calls on an idle system.
    """

    name: str
    monotonic: float
    unloaded: bool = False


@dataclass(frozen=True, slots=True)
class BaselineChanged:
    """``baseline.json`` was rewritten (``provenanced baseline accept``)."""


Change = PathChanged | FullResync | UnitChanged | BaselineChanged


def change_for_signal(event: events.ManagerEvent, reloading: bool, now: float) -> Change | None:
    """The re-read a manager signal asks for (``reloading``: between the two Reloading signals)."""
    if isinstance(event, events.Reloading) and not event.active:
        return FullResync("manager reloaded", now, manager_reloaded=True)
    if isinstance(event, events.ManagerOwnerChanged):
        return FullResync("manager restarted", now, manager_reloaded=True)
    if isinstance(event, events.UnitNew | events.UnitRemoved) and not reloading:
        # A reload frees and re-creates every unit; the resync at its end covers them.
        return UnitChanged(event.name, now, unloaded=isinstance(event, events.UnitRemoved))
    return None


@dataclass(frozen=True, slots=True)
class WatchedPlaces:
    """The watched directories that are not unit directories, and what a change in them means."""

    state_dir: str
    baseline_file: str
    gcroots_dir: str
    packages_dir: str | None = None  # the package database's directory, when there is one
    packages_files: frozenset[str] = frozenset()  # the entries whose change is a new database
    source_dirs: tuple[str, ...] = ()  # generated units' sources: their changes are path changes
    profile: str | None = None  # Home Manager's profile link: the CLI moves it first

    @property
    def extra_dirs(self) -> tuple[str, ...]:
        """The directories to watch besides the unit directories."""
        packages = (self.packages_dir,) if self.packages_dir is not None else ()
        profiles = (posixpath.dirname(self.profile),) if self.profile is not None else ()
        return (self.gcroots_dir, self.state_dir, *packages, *self.source_dirs, *profiles)


def watched_places(
    state_dir: str, dirs: UserDirs, uid: int, packages: PackageDatabase | None
) -> WatchedPlaces:
    """What is watched beside the unit directories: state, gcroots, the package database, and
    generated units' sources (not the distribution's: vouched for by construction)."""
    gcroots = posixpath.dirname(posixpath.join(dirs.home, GCROOT))
    packages_dir, packages_files = packages.watched if packages else (None, frozenset[str]())
    sources = tuple(d for d in quadlet_source_dirs(dirs, uid) if not is_vendor_source(d))
    return WatchedPlaces(
        state_dir,
        baseline.BASELINE_FILE,
        gcroots,
        packages_dir,
        packages_files,
        sources,
        posixpath.join(dirs.home, PROFILE),
    )


def change_for_watch_event(event: WatchEvent, places: WatchedPlaces) -> Change | None:
    """The re-read a file event asks for (None for a watch that could not be added)."""
    if isinstance(event, Overflow):
        return FullResync("inotify overflow", event.monotonic)
    if isinstance(event, WatchLimitReached):
        return None
    if places.packages_dir is not None and posixpath.dirname(event.path) == places.packages_dir:
        # Locks, journals and backups come and go during a run; the database is new at its end.
        if posixpath.basename(event.path) in places.packages_files:
            return FullResync("package database changed", event.monotonic)
        return None
    if posixpath.dirname(event.path) == places.state_dir:
        if posixpath.basename(event.path) == places.baseline_file:
            return BaselineChanged()
        return None
    if event.path.startswith(places.gcroots_dir):
        return FullResync("home manager generation changed", event.monotonic)
    if places.profile is not None and posixpath.dirname(event.path) == posixpath.dirname(
        places.profile
    ):
        # Other profiles and the numbered generation links share the directory.
        if event.path == places.profile:
            return FullResync("home manager profile moved", event.monotonic)
        return None
    return event


__all__ = [
    "BaselineChanged",
    "Change",
    "FullResync",
    "PathChanged",
    "UnitChanged",
    "WatchedPlaces",
    "change_for_signal",
    "change_for_watch_event",
]

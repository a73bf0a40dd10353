"""Which re-read each manager signal and each file event asks for."""

from __future__ import annotations

from dataclasses import replace

import pytest

from provenanced.daemon.changes import (
    BaselineChanged,
    FullResync,
    UnitChanged,
    WatchedPlaces,
    change_for_signal,
    change_for_watch_event,
)
from provenanced.fs.watch import Overflow, PathChanged, WatchLimitReached
from provenanced.systemd import events

PLACES = WatchedPlaces(
    state_dir="/home/u/.local/state/provenanced",
    baseline_file="baseline.json",
    gcroots_dir="/home/u/.local/state/home-manager/gcroots",
)
UNIT_PATH = "/home/u/.config/systemd/user/web.service"


class TestChangeForSignal:
    def test_end_of_a_reload_is_a_full_resync_that_retakes_the_reference(self) -> None:
        """The second Reloading signal asks for everything, as freshly loaded."""
        change = change_for_signal(events.Reloading(active=False), reloading=False, now=5.0)
        assert change == FullResync("manager reloaded", 5.0, manager_reloaded=True)

    def test_start_of_a_reload_asks_for_nothing(self) -> None:
        """The first Reloading signal only announces the reload; the end of it is what counts."""
        assert change_for_signal(events.Reloading(active=True), reloading=True, now=5.0) is None

    def test_a_new_manager_is_a_full_resync_that_retakes_the_reference(self) -> None:
        """A re-executed or restarted manager loaded everything anew."""
        change = change_for_signal(events.ManagerOwnerChanged(":1.9"), reloading=False, now=2.0)
        assert change == FullResync("manager restarted", 2.0, manager_reloaded=True)

    @pytest.mark.parametrize(
        ("event", "unloaded"),
        [(events.UnitNew("a.service", "/o"), False), (events.UnitRemoved("a.service", "/o"), True)],
    )
    def test_a_loaded_or_unloaded_unit_is_one_unit_change(
        self, event: events.ManagerEvent, unloaded: bool
    ) -> None:
        """UnitNew re-reads the unit; UnitRemoved forgets it without reading it again."""
        assert change_for_signal(event, reloading=False, now=1.0) == UnitChanged(
            "a.service", 1.0, unloaded=unloaded
        )

    @pytest.mark.parametrize(
        "event", [events.UnitNew("a.service", "/o"), events.UnitRemoved("a.service", "/o")]
    )
    def test_units_coming_and_going_during_a_reload_are_left_to_its_resync(
        self, event: events.ManagerEvent
    ) -> None:
        """A reload frees and re-creates every unit; the full resync at its end covers them."""
        assert change_for_signal(event, reloading=True, now=1.0) is None

    @pytest.mark.parametrize(
        "event",
        [
            events.JobNew(1, "/j/1", "a.service"),
            events.JobRemoved(1, "/j/1", "a.service", "done"),
            events.UnitFilesChanged(),
        ],
    )
    def test_job_and_other_signals_ask_for_no_reread(self, event: events.ManagerEvent) -> None:
        """Jobs are verified on their own; they change no unit definition."""
        assert change_for_signal(event, reloading=False, now=1.0) is None


class TestChangeForWatchEvent:
    def test_an_overflow_is_a_full_resync(self) -> None:
        """Dropped events leave only a full resync to restore the truth."""
        assert change_for_watch_event(Overflow(3.0), PLACES) == FullResync("inotify overflow", 3.0)

    def test_a_watch_that_could_not_be_added_asks_for_no_reread(self) -> None:
        """Running out of watches shortens the backstop instead."""
        assert change_for_watch_event(WatchLimitReached("/d"), PLACES) is None

    def test_a_rewritten_baseline_is_a_baseline_change(self) -> None:
        """``provenanced baseline accept`` rewrites the file the expectations are built on."""
        event = PathChanged(f"{PLACES.state_dir}/baseline.json", False, 1.0)
        assert change_for_watch_event(event, PLACES) == BaselineChanged()

    def test_other_files_in_the_state_directory_are_ignored(self) -> None:
        """Quarantine and temporary files of the daemon's own are not unit definitions."""
        event = PathChanged(f"{PLACES.state_dir}/.baseline.json.tmp", False, 1.0)
        assert change_for_watch_event(event, PLACES) is None

    def test_a_moved_gcroot_is_a_full_resync(self) -> None:
        """A new Home Manager generation changes what vouches for every link."""
        event = PathChanged(f"{PLACES.gcroots_dir}/current-home", False, 4.0)
        assert change_for_watch_event(event, PLACES) == FullResync(
            "home manager generation changed", 4.0
        )

    def test_a_moved_profile_is_a_full_resync(self) -> None:
        """The CLI moves Home Manager's profile first: the activation begins there."""
        places = replace(PLACES, profile="/home/u/.local/state/nix/profiles/home-manager")
        event = PathChanged("/home/u/.local/state/nix/profiles/home-manager", False, 5.0)
        assert change_for_watch_event(event, places) == FullResync(
            "home manager profile moved", 5.0
        )
        assert "/home/u/.local/state/nix/profiles" in places.extra_dirs

    @pytest.mark.parametrize("name", ["home-manager-3-link", "profile", "channels"])
    def test_other_profile_entries_ask_for_nothing(self, name: str) -> None:
        """Numbered generation links and other profiles share the directory: nothing to read."""
        places = replace(PLACES, profile="/home/u/.local/state/nix/profiles/home-manager")
        event = PathChanged(f"/home/u/.local/state/nix/profiles/{name}", False, 5.0)
        assert change_for_watch_event(event, places) is None

    @pytest.mark.parametrize("name", ["status", "diversions", "lock"])
    def test_the_end_of_a_package_run_is_a_full_resync(self, name: str) -> None:
        """A rewritten status or diversions, or the lock's last close, is a new package database."""
        places = replace(PLACES, packages_dir="/var/lib/dpkg", packages_files=frozenset({name}))
        event = PathChanged(f"/var/lib/dpkg/{name}", False, 6.0)
        assert change_for_watch_event(event, places) == FullResync("package database changed", 6.0)

    @pytest.mark.parametrize("name", ["status-new", "lock-frontend", "updates"])
    def test_files_a_package_run_passes_through_are_ignored(self, name: str) -> None:
        """Temporary files and the update journal come and go while a run is under way."""
        places = replace(PLACES, packages_dir="/var/lib/dpkg", packages_files=frozenset({"status"}))
        assert (
            change_for_watch_event(PathChanged(f"/var/lib/dpkg/{name}", False, 1.0), places) is None
        )

    def test_the_package_database_directory_is_watched_only_when_there_is_one(self) -> None:
        """Without a package database only the generation and the state are watched besides."""
        assert PLACES.extra_dirs == (PLACES.gcroots_dir, PLACES.state_dir)
        places = replace(PLACES, packages_dir="/var/lib/dpkg")
        assert places.extra_dirs == (PLACES.gcroots_dir, PLACES.state_dir, "/var/lib/dpkg")

    def test_a_unit_directory_path_is_passed_on_as_it_is(self) -> None:
        """A change under a unit directory is re-read by path."""
        event = PathChanged(UNIT_PATH, False, 1.0)
        assert change_for_watch_event(event, PLACES) is event

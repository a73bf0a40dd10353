"""A fake Nix store laid out exactly as Home Manager builds a generation."""

from __future__ import annotations

import hashlib
import os
import secrets
import shlex
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal, get_args

from provenanced.sandbox._proc import (
    _NIX_NAME_UNSAFE,
    _WANTS_DIR,
    HM_FILES_SUFFIX,
    HM_GENERATION_SUFFIX,
    NIX_BASE32,
)

# The Home Manager releases whose activation the sandbox replays (see sandbox/hmactivation.py).
Release = Literal["24.11", "25.11", "master"]
RELEASES: tuple[Release, ...] = get_args(Release)

# --- Home Manager layout ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Generation:
    """One Home Manager generation in the fake store: what `current-home` points at."""

    path: Path
    home_files: Path
    files: tuple[str, ...]
    release: Release = "25.11"

    def source(self, rel: str) -> Path:
        """The store file a home-relative path finally resolves to in this generation."""
        return Path(os.path.realpath(self.home_files / rel))

    @property
    def activate_script(self) -> Path:
        """`<generation>/activate`, what every way of activating ends up running."""
        return self.path / "activate"

    @classmethod
    def from_store(cls, path: Path) -> Generation:
        """Read a generation back from its store path, as its own `activate` script has to."""
        home_files = Path(os.path.realpath(path / "home-files"))
        release = (path / "hm-version").read_text().strip()
        if release not in RELEASES:
            raise ValueError(f"{path} was not built by a known release: {release!r}")
        files = tuple(sorted(os.path.relpath(p, home_files) for p in find_files(home_files)))
        return cls(path, home_files, files, release)


def find_files(root: Path) -> Iterator[Path]:
    """`find ROOT \\( -type f -or -type l \\)`: pre-order, each directory in readdir order."""
    with os.scandir(root) as entries:
        listed = list(entries)
    for entry in listed:
        if entry.is_dir(follow_symlinks=False):
            yield from find_files(Path(entry.path))
        else:
            yield Path(entry.path)


def _nix_base32(digest: bytes) -> str:
    """Encode like Nix's printHash32 (least significant bits last) so names look genuine."""
    length = (len(digest) * 8 + 4) // 5
    chars = []
    for n in range(length - 1, -1, -1):
        bit = n * 5
        i, j = divmod(bit, 8)
        c = digest[i] >> j
        if i + 1 < len(digest):
            c |= digest[i + 1] << (8 - j)
        chars.append(NIX_BASE32[c & 0x1F])
    return "".join(chars)


def _store_hash(*parts: str) -> str:
    """A 32-character store hash, deterministic so identical inputs reuse one store path."""
    digest = hashlib.sha256("\0".join(("provenanced-sandbox", *parts)).encode()).digest()
    return _nix_base32(digest[:20])


def _check_rel(rel: str) -> PurePosixPath:
    """Reject paths that would escape HOME or the store tree."""
    path = PurePosixPath(rel)
    if not rel or path.is_absolute() or ".." in path.parts or path.name in ("", "."):
        raise ValueError(f"not a home-relative file path: {rel!r}")
    return path


def _write_store_file(store: Path, rel: str, content: str) -> Path:
    """Add one read-only file to the store unless an identical one is already there."""
    name = _NIX_NAME_UNSAFE.sub("-", PurePosixPath(rel).name)
    target = store / f"{_store_hash('file', rel, content)}-{name}"
    if not target.exists():
        tmp = store / f".tmp-{secrets.token_hex(8)}"
        tmp.write_text(content)
        tmp.chmod(0o444)
        os.replace(tmp, target)
    return target


def _sources(store: Path, files: Mapping[str, str]) -> dict[str, Path]:
    """Map each relative path to its store file; `.wants/` entries reuse the named unit's file."""
    sources = {rel: _write_store_file(store, rel, text) for rel, text in files.items()}
    for rel in files:
        path = PurePosixPath(rel)
        if _WANTS_DIR.search(path.parent.name):
            unit_rel = str(path.parent.parent / path.name)
            if unit_rel in sources:
                sources[rel] = sources[unit_rel]
    return sources


def _publish_dir(store: Path, name: str, fill: Callable[[Path], None]) -> Path:
    """Build a store directory under a temp name and rename it in, like a Nix build output."""
    final = store / name
    if final.exists():
        return final
    tmp = store / f".tmp-{secrets.token_hex(8)}"
    tmp.mkdir()
    fill(tmp)
    for dirpath, _dirs, _files in os.walk(tmp):
        os.chmod(dirpath, 0o555)
    os.replace(tmp, final)
    return final


def _activate_script(generation: Path, release: Release) -> str:
    """The generation's `activate`: Home Manager's activation script, replayed in Python."""
    python = shlex.quote(sys.executable)
    return (
        "#!/bin/sh\n"
        f"# Home Manager {release} activation, replayed by provenanced.sandbox.hmcli.\n"
        f'exec {python} -m provenanced.sandbox.hmcli activate {generation} "$@"\n'
    )


def build_generation(
    store: Path, files: Mapping[str, str], name_hint: str = "", release: Release = "25.11"
) -> Generation:
    """Lay out files the way Home Manager's home-files and generation derivations do.

    Args:
        files: home-relative path → content (`.config/systemd/user/web.service`).
        name_hint: mixed into the hashes so equal file sets can still give distinct generations.
        release: the Home Manager release whose activation this generation's `activate` replays.
    """
    if release not in RELEASES:
        raise ValueError(f"unknown Home Manager release {release!r}; one of {RELEASES}")
    rels = sorted(str(_check_rel(rel)) for rel in files)
    store.mkdir(parents=True, exist_ok=True)
    sources = _sources(store, {str(PurePosixPath(rel)): text for rel, text in files.items()})
    listing = "\n".join(f"{rel}\t{sources[rel].name}" for rel in rels)

    def fill_files(tmp: Path) -> None:
        for rel in rels:
            link = tmp / rel
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(sources[rel])

    home_files = _publish_dir(
        store, f"{_store_hash('home-files', name_hint, listing)}{HM_FILES_SUFFIX}", fill_files
    )
    name = f"{_store_hash('generation', name_hint, home_files.name, release)}{HM_GENERATION_SUFFIX}"

    # modules/home-environment.nix (release-25.11) L869-893: hm-version, gen-version (absent up
    # to 24.11, which is how the CLI tells a legacy generation), activate, bin/, home-files.
    def fill_generation(tmp: Path) -> None:
        (tmp / "hm-version").write_text(f"{release}\n")
        if release != "24.11":
            (tmp / "gen-version").write_text("1\n")
        script = tmp / "activate"
        script.write_text(_activate_script(store / name, release))
        script.chmod(0o555)
        (tmp / "bin").mkdir()
        (tmp / "bin/home-manager-generation").symlink_to(store / name / "activate")
        (tmp / "home-files").symlink_to(home_files)

    generation = _publish_dir(store, name, fill_generation)
    return Generation(generation, home_files, tuple(rels), release)


_UNITS = ".config/systemd/user"
_PODMAN_WEB = """\
[Unit]
Description=Homelab web front end (podman)
Documentation=https://example.invalid/homelab/web

[Service]
Type=simple
ExecStart=/bin/sleep infinity
Restart=on-failure

[Install]
WantedBy=default.target
"""
_BACKUP_SERVICE = """\
[Unit]
Description=Homelab volume backup

[Service]
Type=oneshot
ExecStart=/bin/true
"""
_BACKUP_TIMER = """\
[Unit]
Description=Run the homelab backup daily

[Timer]
OnCalendar=daily

[Install]
WantedBy=timers.target
"""


def example_units() -> dict[str, str]:
    """A small homelab tree as Home Manager would generate it, loadable by systemd 252."""
    return {
        f"{_UNITS}/podman-web.service": _PODMAN_WEB,
        f"{_UNITS}/podman-web.service.d/10-env.conf": (
            "[Service]\nEnvironment=WEB_PORT=8080 WEB_ROOT=/srv/www\n"
        ),
        f"{_UNITS}/default.target.wants/podman-web.service": _PODMAN_WEB,
        f"{_UNITS}/backup.service": _BACKUP_SERVICE,
        f"{_UNITS}/backup.timer": _BACKUP_TIMER,
        f"{_UNITS}/timers.target.wants/backup.timer": _BACKUP_TIMER,
    }


def _sync_unit(name: str) -> str:
    """A long-running service pulled in by default.target, so a switch has to stop or start it."""
    return (
        f"[Unit]\nDescription=Homelab {name}\n\n[Service]\nExecStart=/bin/sleep infinity\n\n"
        "[Install]\nWantedBy=default.target\n"
    )


def example_switch() -> tuple[dict[str, str], dict[str, str]]:
    """Two generations: podman-web changes, backup stays, old-sync goes, new-sync comes."""
    before = example_units()
    before[f"{_UNITS}/old-sync.service"] = _sync_unit("old sync")
    before[f"{_UNITS}/default.target.wants/old-sync.service"] = _sync_unit("old sync")
    after = example_units()
    after[f"{_UNITS}/podman-web.service"] = _PODMAN_WEB.replace(
        "Restart=on-failure", "Restart=always"
    )
    after[f"{_UNITS}/default.target.wants/podman-web.service"] = after[
        f"{_UNITS}/podman-web.service"
    ]
    after[f"{_UNITS}/new-sync.service"] = _sync_unit("new sync")
    after[f"{_UNITS}/default.target.wants/new-sync.service"] = _sync_unit("new sync")
    return before, after

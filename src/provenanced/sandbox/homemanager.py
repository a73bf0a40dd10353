"""A fake Nix store laid out exactly as Home Manager builds a generation."""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from provenanced.sandbox._proc import (
    _NIX_NAME_UNSAFE,
    _WANTS_DIR,
    HM_FILES_SUFFIX,
    HM_GENERATION_SUFFIX,
    NIX_BASE32,
    SandboxError,
)

# --- Home Manager layout ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Generation:
    """One Home Manager generation in the fake store: what `current-home` points at."""

    path: Path
    home_files: Path
    files: tuple[str, ...]

    def source(self, rel: str) -> Path:
        """The store file a home-relative path finally resolves to in this generation."""
        return Path(os.path.realpath(self.home_files / rel))


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


def build_generation(store: Path, files: Mapping[str, str], name_hint: str = "") -> Generation:
    """Lay out files the way Home Manager's home-files and generation derivations do.

    Args:
        files: home-relative path → content (`.config/systemd/user/web.service`).
        name_hint: mixed into the hashes so equal file sets can still give distinct generations.
    """
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

    def fill_generation(tmp: Path) -> None:
        (tmp / "home-files").symlink_to(home_files)
        script = tmp / "activate"
        script.write_text(
            "#!/bin/sh\n"
            "# provenanced sandbox: provenanced.sandbox.activate() links this generation.\n"
            "exit 0\n"
        )
        script.chmod(0o555)

    generation = _publish_dir(
        store,
        f"{_store_hash('generation', name_hint, home_files.name)}{HM_GENERATION_SUFFIX}",
        fill_generation,
    )
    return Generation(path=generation, home_files=home_files, files=tuple(rels))


def _link_atomically(link: Path, target: Path | str) -> None:
    """Point link at target with a temp name and rename, so readers never see it missing."""
    tmp = link.with_name(f".{link.name}.tmp-{secrets.token_hex(6)}")
    tmp.symlink_to(target)
    os.replace(tmp, link)


def _points_into_hm_files(link: Path) -> bool:
    """Only links Home Manager made may be removed; anything else belongs to the user."""
    if not link.is_symlink():
        return False
    return any(part.endswith(HM_FILES_SUFFIX) for part in Path(os.readlink(link)).parts)


def _remove_empty_parents(path: Path, stop_at: Path) -> None:
    """Drop directories emptied by a removed link, as `rmdir -p --ignore-fail-on-non-empty`."""
    for parent in path.parents:
        if parent == stop_at or stop_at not in parent.parents:
            return
        try:
            parent.rmdir()
        except OSError:
            return


def _previous_home_files(gcroot: Path) -> Path | None:
    """The home-files tree of the generation being replaced, if any."""
    if not gcroot.is_symlink():
        return None
    home_files = Path(os.readlink(gcroot)) / "home-files"
    return Path(os.path.realpath(home_files)) if home_files.exists() else None


def _bump_profile(home: Path, generation: Path) -> None:
    """Add a `home-manager-N-link` profile generation the way `nix-env --set` does."""
    profiles = home / ".local/state/nix/profiles"
    profiles.mkdir(parents=True, exist_ok=True)
    profile = profiles / "home-manager"
    if profile.exists() and Path(os.path.realpath(profile)) == Path(os.path.realpath(generation)):
        return
    numbers = [
        int(m.group(1))
        for p in profiles.iterdir()
        if (m := re.fullmatch(r"home-manager-(\d+)-link", p.name))
    ]
    numbered = profiles / f"home-manager-{max(numbers, default=0) + 1}-link"
    numbered.symlink_to(generation)
    _link_atomically(profile, numbered.name)


def activate(home: Path, gen: Generation) -> None:
    """Switch HOME to a generation like Home Manager's checkLinkTargets + linkGeneration."""
    for rel in gen.files:
        target = home / rel
        if os.path.lexists(target) and not target.is_symlink():
            raise SandboxError(f"existing file {target} is in the way of Home Manager's link")
    gcroot = home / ".local/state/home-manager/gcroots/current-home"
    previous = _previous_home_files(gcroot)
    for rel in gen.files:
        target = home / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        _link_atomically(target, gen.home_files / rel)
    if previous is not None and previous != gen.home_files:
        wanted = set(gen.files)
        for dirpath, _dirs, names in os.walk(previous):
            for name in names:
                rel = os.path.relpath(os.path.join(dirpath, name), previous)
                target = home / rel
                if rel not in wanted and _points_into_hm_files(target):
                    target.unlink()
                    _remove_empty_parents(target, home)
    gcroot.parent.mkdir(parents=True, exist_ok=True)
    _link_atomically(gcroot, gen.path)
    _bump_profile(home, gen.path)


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

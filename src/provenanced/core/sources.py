"""Where generated units come from: the sources generators read, podman quadlet's first."""

from __future__ import annotations

import posixpath

from provenanced.core.unitpath import UserDirs

# Directories a vendor package fills: a source there is vouched for like a vendor-tier unit.
_VENDOR_PREFIXES = ("/usr/", "/lib/")


def quadlet_source_dirs(dirs: UserDirs, uid: int) -> tuple[str, ...]:
    """The directories rootless quadlet reads ``.container``/``.pod``/... files from.

    As podman's cmd/quadlet/main.go builds them for a user generator (getUnitDirs with
    rootless=true; the admin root is UnitDirAdmin in pkg/systemd/quadlet/quadlet.go). Subdirectories
    of these are read too and are not listed here. The ``/usr/share`` pair is the distribution's
    counterpart, named in newer podman releases (not verified against a release's source).
    """
    return (
        posixpath.join(dirs.config_home, "containers/systemd"),
        posixpath.join(dirs.runtime_dir, "containers/systemd"),
        "/etc/containers/systemd/users",
        f"/etc/containers/systemd/users/{uid}",
        "/usr/share/containers/systemd/users",
        f"/usr/share/containers/systemd/users/{uid}",
    )


def is_vendor_source(path: str) -> bool:
    """A source a distribution package installs, vouched for like the vendor tier."""
    return path.startswith(_VENDOR_PREFIXES)

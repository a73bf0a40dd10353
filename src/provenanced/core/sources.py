"""Where generated units come from: the sources generators read, podman quadlet's first."""

from __future__ import annotations

import posixpath

from provenanced.core.unitpath import UserDirs

# A vendor package's directories, and the kernel's virtual file systems: vouched for by
# construction, like a vendor-tier unit.
_VENDOR_PREFIXES = ("/usr/", "/lib/", "/proc/", "/sys/")


def quadlet_source_dirs(dirs: UserDirs, uid: int) -> tuple[str, ...]:
    """The directories rootless quadlet reads ``.container``/``.pod``/... files from, in its order.

    As podman builds them for a user generator: getRootlessDirs() in
    pkg/systemd/quadlet/unitdirs.go (podman c6580b4, L219-245) adds the runtime directory, then
    the config directory, then ``users`` and ``users/$UID`` under UnitDirAdmin (/etc) and
    UnitDirDistro (/usr/share); cmd/quadlet/main.go loadUnitsFromDir() keeps the first file of a
    name. Subdirectories of these are read too and are not listed here.
    """
    return (
        posixpath.join(dirs.runtime_dir, "containers/systemd"),
        posixpath.join(dirs.config_home, "containers/systemd"),
        "/etc/containers/systemd/users",
        f"/etc/containers/systemd/users/{uid}",
        "/usr/share/containers/systemd/users",
        f"/usr/share/containers/systemd/users/{uid}",
    )


def is_vendor_source(path: str) -> bool:
    """A source the system itself provides, vouched for like the vendor tier.

    A distribution package's file under /usr, or the kernel's own tables: the manager's mount and
    swap units name ``/proc/self/mountinfo`` and ``/proc/swaps`` as their SourcePath.
    """
    return path.startswith(_VENDOR_PREFIXES)

"""Pure rules of unit names: which names systemd loads as units, and which files it reads."""

from __future__ import annotations

import string

# Entries of these subdirectories are links that enable a unit, named after the enabled unit.
DEPENDENCY_DIR_SUFFIXES = (".wants", ".requires", ".upholds")
# systemd's UNIT_NAME_MAX is 256 with the terminating NUL.
UNIT_NAME_MAX = 255
UNIT_TYPES = frozenset(
    {
        "service",
        "socket",
        "target",
        "device",
        "mount",
        "automount",
        "swap",
        "timer",
        "path",
        "slice",
        "scope",
    }
)
# VALID_CHARS of systemd's unit-name.c plus "@", which may appear anywhere after the first one.
_NAME_CHARS = frozenset(string.ascii_letters + string.digits + ":-_.\\@")


def unit_suffix(name: str) -> str:
    """The unit type after the last dot (``service`` for ``foo.service``); "" without a dot."""
    _, dot, suffix = name.rpartition(".")
    return suffix if dot else ""


def is_valid_unit_name(name: str) -> bool:
    """Whether systemd accepts ``name`` as a plain, template or instance unit name."""
    if not name or len(name) > UNIT_NAME_MAX:
        return False
    stem, dot, suffix = name.rpartition(".")
    if not dot or not stem or suffix not in UNIT_TYPES:
        return False
    return set(stem) <= _NAME_CHARS and not stem.startswith("@")


def is_template(name: str) -> bool:
    """Whether ``name`` is a template (``foo@.service``); the manager loads only its instances."""
    stem, _, _ = name.rpartition(".")
    # unit_name_is_valid(): a template's first "@" is right before the type suffix.
    return bool(stem) and stem.find("@") == len(stem) - 1


def could_define_unit(path: str) -> bool:
    """Whether systemd could read ``path`` as a unit file or a drop-in, judging by its name alone.

    The manager reads only files named as units (fragments, aliases, enablement links) and
    ``*.conf`` drop-ins; anything else in a unit directory never reaches it.
    """
    name = path.rpartition("/")[2]
    return name.endswith(".conf") or is_valid_unit_name(name)


def template_of(name: str) -> str | None:
    """``foo@.service`` for the instance ``foo@bar.service``; None for plain names and templates."""
    stem, _, suffix = name.rpartition(".")
    prefix, at, instance = stem.partition("@")
    return f"{prefix}@.{suffix}" if at and instance else None


def could_be_read_at(relative: str) -> bool:
    """Whether the manager could read a file at ``relative`` (to its unit directory), by name.

    A fragment or an enablement link must carry a unit name, a drop-in must end in ``.conf``
    (systemd's src/shared/dropin.c keeps only ``.conf`` drop-ins and src/core/load-dropin.c
    only valid unit names in ``.wants``/``.requires``/``.upholds``): GNU ln's ``CuXXXXXX`` temp links, ``-b`` backups and editor
    swap files never reach it.
    """
    head, _, tail = relative.partition("/")
    if not tail:
        return is_valid_unit_name(head) or head.endswith((".d", *DEPENDENCY_DIR_SUFFIXES))
    if "/" in tail:
        return False
    if head.endswith(".d"):
        return tail.endswith(".conf")
    if head.endswith(DEPENDENCY_DIR_SUFFIXES):
        return is_valid_unit_name(tail)
    return False

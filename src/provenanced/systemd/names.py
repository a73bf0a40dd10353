"""Pure rules of systemd unit names: bus object paths, validity, templates, drop-in directories."""

from __future__ import annotations

import string

UNIT_PATH_PREFIX = "/org/freedesktop/systemd1/unit/"
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
_LABEL_SAFE = frozenset((string.ascii_letters + string.digits).encode())
_DIGITS = frozenset(string.digits.encode())
_HEX = frozenset(string.hexdigits)


def bus_label_escape(text: str) -> str:
    """systemd's ``bus_label_escape``: every byte but [A-Za-z0-9], and a leading digit, as ``_xx``."""
    raw = text.encode("utf-8", "surrogateescape")
    if not raw:
        return "_"
    return "".join(
        chr(byte)
        if byte in _LABEL_SAFE and not (index == 0 and byte in _DIGITS)
        else f"_{byte:02x}"
        for index, byte in enumerate(raw)
    )


def bus_label_unescape(label: str) -> str:
    """systemd's ``bus_label_unescape``: ``_xx`` back to its byte; anything else stays literal."""
    if label == "_":
        return ""
    out = bytearray()
    index = 0
    while index < len(label):
        pair = label[index + 1 : index + 3]
        if label[index] == "_" and len(pair) == 2 and set(pair) <= _HEX:
            out.append(int(pair, 16))
            index += 3
        else:
            out.extend(label[index].encode("utf-8", "surrogateescape"))
            index += 1
    return out.decode("utf-8", "surrogateescape")


def unit_object_path(name: str) -> str:
    """The bus object path the manager gives the unit ``name``."""
    return UNIT_PATH_PREFIX + bus_label_escape(name)


def unescape_unit_path(path: str) -> str:
    """The unit name behind a unit object path; ValueError for any other path."""
    label = path.removeprefix(UNIT_PATH_PREFIX)
    if label == path or not label or "/" in label:
        raise ValueError(f"not a unit object path: {path!r}")
    return bus_label_unescape(label)


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


def _dash_prefixes(name: str) -> list[str]:
    """The ``foo-bar-.service``, ``foo-.service`` names systemd derives, most specific first."""
    stem, _, suffix = name.rpartition(".")
    prefix = stem.partition("@")[0]
    found: list[str] = []
    chopped = False
    # Mirrors unit_file_find_dirs(): cut after the last dash, but drop a trailing dash once first.
    while (dash := prefix.rfind("-")) > 0:
        if dash + 1 < len(prefix) or chopped:
            prefix = prefix[: dash + 1]
            found.append(f"{prefix}.{suffix}")
            chopped = False
        else:
            prefix = prefix[:dash]
            chopped = True
    return found


def dropin_dirs_for(name: str) -> tuple[str, ...]:
    """The drop-in directory names systemd reads for ``name``, least specific first."""
    if not is_valid_unit_name(name):
        raise ValueError(f"not a valid unit name: {name!r}")
    template = template_of(name)
    specific_first = [name]
    if template is not None:
        specific_first += [template, *_dash_prefixes(template)]
    specific_first += _dash_prefixes(name)
    # The top-level "<type>.d" comes last in systemd's list: the most generic, overridable by all.
    specific_first.append(unit_suffix(name))
    unique = dict.fromkeys(specific_first)
    return tuple(f"{entry}.d" for entry in reversed(unique))

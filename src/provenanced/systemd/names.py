"""Pure rules of systemd unit names: bus object paths, validity, templates, drop-in directories."""

from __future__ import annotations

import string

from provenanced.core.unitnames import (
    UNIT_NAME_MAX,
    UNIT_TYPES,
    could_define_unit,
    is_template,
    is_valid_unit_name,
    template_of,
    unit_suffix,
)

UNIT_PATH_PREFIX = "/org/freedesktop/systemd1/unit/"
__all__ = [
    "UNIT_NAME_MAX",
    "UNIT_TYPES",
    "bus_label_escape",
    "bus_label_unescape",
    "could_define_unit",
    "dropin_dirs_for",
    "is_template",
    "is_valid_unit_name",
    "template_of",
    "unescape_unit_path",
    "unit_object_path",
    "unit_suffix",
]
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

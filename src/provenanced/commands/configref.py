"""The configuration reference, generated from the Settings model so the docs cannot drift.

``python -m provenanced.commands.configref --write`` regenerates the README table (between its markers)
and ``config/provenanced.example.toml``; ``--check`` fails when either is out of date.
"""

from __future__ import annotations

import argparse
import enum
import json
import sys
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from provenanced.config import Settings

TABLE_START = "<!-- config-table:start -->"
TABLE_END = "<!-- config-table:end -->"
README = Path("README.md")
EXAMPLE = Path("config/provenanced.example.toml")
ENV_PREFIX = "PROVENANCED_"
_UNSET = "(unset)"


@dataclass(frozen=True, slots=True)
class Key:
    """One leaf setting: where it lives in TOML and the environment, and what it accepts."""

    section: tuple[str, ...]
    name: str
    type: str
    default: str
    description: str

    @property
    def dotted(self) -> str:
        """The key as ``section.sub.name``, how errors and the table name it."""
        return ".".join((*self.section, self.name))

    @property
    def env(self) -> str:
        """The environment variable that overrides it (pydantic-settings' ``__`` nesting)."""
        return ENV_PREFIX + "__".join(part.upper() for part in (*self.section, self.name))


@dataclass(frozen=True, slots=True)
class Section:
    """A TOML table: its path and the one-line purpose from the model's docstring."""

    path: tuple[str, ...]
    doc: str
    keys: tuple[Key, ...]


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def sections(model: type[BaseModel] = Settings, path: tuple[str, ...] = ()) -> Iterator[Section]:
    """Every table of the model, depth first, the root first (its keys have no section)."""
    keys, nested = [], []
    for name, field in model.model_fields.items():
        sub = _nested_model(field.annotation)
        if sub is not None:
            nested.append((name, sub))
        else:
            keys.append(_key(path, name, field))
    doc = (model.__doc__ or "").strip().splitlines()[0] if model.__doc__ else ""
    yield Section(path, doc, tuple(keys))
    for name, sub in nested:
        yield from sections(sub, (*path, name))


def leaf_keys(model: type[BaseModel] = Settings) -> list[Key]:
    """Every leaf setting in file order."""
    return [key for section in sections(model) for key in section.keys]


def _key(section: tuple[str, ...], name: str, field: FieldInfo) -> Key:
    default = field.get_default(call_default_factory=True)
    return Key(
        section=section,
        name=name,
        type=type_name(field.annotation) + _constraints(field),
        default=_UNSET if default is None else toml_value(default),
        description=field.description or "",
    )


def type_name(annotation: Any) -> str:
    """A reader's name for a field type: ``float``, ``list of strings``, ``"a" | "b"``."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin in (Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        named = " | ".join(type_name(a) for a in rest)
        return f"{named} (optional)" if len(rest) < len(args) else named
    if origin in (tuple, list):
        return f"list of {type_name(args[0])}s"
    if origin is dict:
        return f"table: {type_name(args[0])} → {type_name(args[1])}"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "drift kind"
    names = {str: "string", float: "float", int: "integer", bool: "boolean", Path: "path"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _constraints(field: FieldInfo) -> str:
    bounds = []
    for item in field.metadata:
        for attr, symbol in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            if isinstance(item, annotated_types.BaseMetadata) and hasattr(item, attr):
                bounds.append(f"{symbol} {getattr(item, attr)}")
    return f", {', '.join(bounds)}" if bounds else ""


def toml_value(value: Any) -> str:
    """A default as TOML source: JSON's string, number and array syntax is valid TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        return json.dumps(value.value)
    if isinstance(value, Path):
        return json.dumps(str(value))
    if isinstance(value, dict):
        inner = ", ".join(
            f"{toml_value(k).strip(chr(34))} = {toml_value(v)}" for k, v in value.items()
        )
        return f"{{ {inner} }}" if inner else "{}"
    if isinstance(value, tuple | list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_table(model: type[BaseModel] = Settings) -> str:
    """The README's configuration table, one row per leaf setting."""
    lines = [
        "| Key | Type | Default | Environment variable | Description |",
        "| --- | --- | --- | --- | --- |",
    ]
    for key in leaf_keys(model):
        default = key.default if key.default == _UNSET else f"`{key.default}`"
        cells = (f"`{key.dotted}`", key.type, default, f"`{key.env}`", key.description)
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def render_example(model: type[BaseModel] = Settings) -> str:
    """The example config: every key commented out at its default, so the file loads as defaults."""
    out = [
        "# provenanced configuration: $XDG_CONFIG_HOME/provenanced/config.toml, or --config PATH.",
        "# Every key is listed at its default, commented out: uncomment a line to change it.",
        "# The environment overrides this file: PROVENANCED_<SECTION>__<KEY>, lists and tables as",
        '# JSON, e.g. PROVENANCED_PROVENANCE__MANAGED_ROOTS=\'["/nix/store", "/gnu/store"]\'.',
        "# `provenanced check-config` prints the effective configuration; after a change,",
        "# `systemctl --user reload provenanced` applies it to the running service.",
        "#",
        "# Generated from the Settings model by `python -m provenanced.commands.configref --write`.",
    ]
    for section in sections(model):
        if section.path:
            out += ["", f"# {section.doc}", f"[{'.'.join(section.path)}]"]
        for key in section.keys:
            out += ["", f"# {key.description}", f"# Type: {key.type}. Environment: {key.env}"]
            out.append(f"# {key.name} = {key.default}")
    return "\n".join(out) + "\n"


def splice_table(readme: str, table: str) -> str:
    """The README with the text between the table markers replaced by ``table``."""
    start, end = readme.find(TABLE_START), readme.find(TABLE_END)
    if start < 0 or end < start:
        raise ValueError(f"README has no {TABLE_START} … {TABLE_END} markers")
    head = readme[: start + len(TABLE_START)]
    return f"{head}\n{table}{readme[end:]}"


def stale_files(root: Path) -> list[Path]:
    """The generated files under ``root`` that differ from what the model generates now."""
    readme = (root / README).read_text()
    stale = []
    if splice_table(readme, render_table()) != readme:
        stale.append(root / README)
    example = root / EXAMPLE
    if not example.exists() or example.read_text() != render_example():
        stale.append(example)
    return stale


def write_files(root: Path) -> list[Path]:
    """Regenerate the README table and the example file; returns the files that changed."""
    changed = stale_files(root)
    readme = root / README
    readme.write_text(splice_table(readme.read_text(), render_table()))
    (root / EXAMPLE).parent.mkdir(parents=True, exist_ok=True)
    (root / EXAMPLE).write_text(render_example())
    return changed


def main(argv: Sequence[str] | None = None) -> int:
    """Print the table, or write or check the generated files of a checkout."""
    parser = argparse.ArgumentParser(
        prog="python -m provenanced.commands.configref", description=__doc__
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--write", action="store_true", help="regenerate README.md's table and the example"
    )
    mode.add_argument("--check", action="store_true", help="exit 1 when either is out of date")
    mode.add_argument(
        "--example", action="store_true", help="print the example TOML instead of the table"
    )
    parser.add_argument("--root", type=Path, default=Path.cwd(), help="the checkout (default: .)")
    args = parser.parse_args(argv)
    if not (args.write or args.check):
        sys.stdout.write(render_example() if args.example else render_table())
        return 0
    if not (args.root / README).is_file():
        print(
            f"configref: no {README} in {args.root}; run it from the checkout or pass --root",
            file=sys.stderr,
        )
        return 2
    if args.write:
        for path in write_files(args.root):
            print(f"wrote {path}")
        return 0
    stale = stale_files(args.root)
    for path in stale:
        print(
            f"configref: {path} is out of date; run python -m provenanced.commands.configref --write",
            file=sys.stderr,
        )
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())

"""The dependency rules of the layout, checked by parsing imports: folders, not a hand-kept list."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from helpers import parse_python

SRC = Path(__file__).resolve().parents[2] / "src" / "provenanced"
ALL = sorted(SRC.rglob("*.py"))
# The pure core: plain data in, plain data out. model.py is the vocabulary it shares.
CORE = [*sorted((SRC / "core").glob("*.py")), SRC / "model.py"]
PURE_PROVENANCED = ("provenanced.core", "provenanced.model")
IO_MODULES = frozenset({"os", "subprocess", "socket", "asyncio", "shutil", "io", "pathlib"})
# Adapters translate one outside system each; they never reach into the daemon or commands.
ADAPTERS = ("systemd", "fs", "expect", "sinks")
SHELL_ONLY = ("provenanced.daemon", "provenanced.commands", "provenanced.cli")


def imports_of(path: Path) -> set[str]:
    tree = parse_python(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def module_name(path: Path) -> str:
    return ".".join(("provenanced", *path.relative_to(SRC).with_suffix("").parts))


def _in(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


class TestCore:
    @pytest.mark.parametrize("path", CORE, ids=module_name)
    def test_imports_only_the_stdlib_and_the_core(self, path: Path) -> None:
        """The core never reaches for I/O libraries or the imperative shell."""
        for imported in imports_of(path):
            top = imported.split(".")[0]
            if top == "provenanced":
                assert _in(imported, PURE_PROVENANCED), f"{module_name(path)} imports {imported}"
            else:
                assert top in sys.stdlib_module_names, f"{module_name(path)} imports {imported}"
                assert top not in IO_MODULES, f"{module_name(path)} does I/O via {top}"

    def test_the_core_folder_holds_the_audit(self) -> None:
        """The rule covers the modules that judge, so moving one out is a visible change."""
        names = {p.stem for p in CORE}
        assert {"audit", "vouching", "incremental", "state", "transitions", "jobs"} <= names


class TestLayers:
    @pytest.mark.parametrize("path", ALL, ids=module_name)
    def test_nothing_imports_cli(self, path: Path) -> None:
        """The CLI is the outermost layer."""
        assert "provenanced.cli" not in imports_of(path) or path.name == "__main__.py"

    @pytest.mark.parametrize(
        "path", [p for a in ADAPTERS for p in sorted((SRC / a).glob("*.py"))], ids=module_name
    )
    def test_adapters_never_import_the_daemon_or_commands(self, path: Path) -> None:
        """Adapters produce and consume model values; the daemon and commands wire them."""
        assert not any(_in(i, SHELL_ONLY) for i in imports_of(path))

    @pytest.mark.parametrize("path", sorted((SRC / "sinks").glob("*.py")), ids=module_name)
    def test_sinks_never_call_systemd(self, path: Path) -> None:
        """Sinks consume model values; they never talk to the manager."""
        assert not any(i.startswith("provenanced.systemd") for i in imports_of(path))

    @pytest.mark.parametrize("path", sorted((SRC / "daemon").glob("*.py")), ids=module_name)
    def test_the_daemon_never_imports_commands(self, path: Path) -> None:
        """Commands run beside the daemon, never inside it."""
        assert not any(_in(i, ("provenanced.commands",)) for i in imports_of(path))

    def test_only_config_imports_pydantic(self) -> None:
        """Validation happens once, at the edge."""
        users = {
            module_name(p)
            for p in ALL
            if any(i.split(".")[0].startswith("pydantic") for i in imports_of(p))
        }
        assert users <= {"provenanced.config", "provenanced.commands.configref"}

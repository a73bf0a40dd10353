"""The dependency rule of the functional core, checked by parsing imports."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from helpers import parse_python

SRC = Path(__file__).resolve().parents[2] / "src" / "provenanced"
# The pure core: plain data in, plain data out, no I/O and no shell imports.
CORE = {"model", "unitpath", "audit", "incremental", "describe", "index", "transitions"}


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


ALL = sorted(SRC.rglob("*.py"))


class TestDependencyRule:
    @pytest.mark.parametrize("name", sorted(CORE))
    def test_core_imports_only_stdlib_and_core(self, name: str) -> None:
        """The core never reaches for I/O libraries or the imperative shell."""
        for imported in imports_of(SRC / f"{name}.py"):
            top = imported.split(".")[0]
            if top == "provenanced":
                assert imported.split(".")[1] in CORE, f"{name} imports {imported}"
            else:
                assert top in sys.stdlib_module_names, f"{name} imports {imported}"
                assert top not in {"os", "subprocess", "socket", "asyncio"}, (
                    f"{name} does I/O via {top}"
                )

    @pytest.mark.parametrize("path", ALL, ids=lambda p: module_name(p))
    def test_nothing_imports_cli(self, path: Path) -> None:
        """The CLI is the outermost layer."""
        assert "provenanced.cli" not in imports_of(path) or path.name == "__main__.py"

    @pytest.mark.parametrize("path", sorted((SRC / "sinks").glob("*.py")), ids=lambda p: p.name)
    def test_sinks_never_call_systemd(self, path: Path) -> None:
        """Sinks consume model values; they never talk to the manager."""
        assert not any(i.startswith("provenanced.systemd") for i in imports_of(path))

    def test_only_config_imports_pydantic(self) -> None:
        """Validation happens once, at the edge."""
        users = {
            module_name(p)
            for p in ALL
            if any(i.split(".")[0].startswith("pydantic") for i in imports_of(p))
        }
        assert users <= {"provenanced.config", "provenanced.configref"}

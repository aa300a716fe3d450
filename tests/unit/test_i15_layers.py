"""Imports point one way (design.md "Layout"): agent -> updater -> trust; publisher may use
updater's format code and trust; the simulator may use everything but the CLI, which sits on
top and calls the rest. Every import counts, also those inside functions: a lazy import is
still a dependency. This keeps the graph free of cycles between packages (the demo runs the
CLI as a process, it does not import it)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ALLOWED: dict[str, set[str]] = {
    "trust": set(),
    "updater": {"trust"},
    "agent": {"updater", "trust"},
    "publisher": {"updater", "trust"},
    "simulator": {"agent", "updater", "trust", "publisher"},
}


def _imports(path: Path) -> list[tuple[int, str]]:
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
            if node.module == "modelward":
                out += [(node.lineno, f"modelward.{a.name}") for a in node.names]
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
    return out


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_point_one_way(package: str) -> None:
    bad = []
    files = sorted((ROOT / package).rglob("*.py"))
    assert files
    for f in files:
        for line, module in _imports(f):
            parts = module.split(".")
            if parts[0] in ALLOWED:
                bad.append(f"{f.relative_to(ROOT)}:{line}: bare top-level import {module}")
            elif parts[0] == "modelward" and len(parts) > 1:
                target = parts[1]
                if target != package and target not in ALLOWED[package]:
                    bad.append(f"{f.relative_to(ROOT)}:{line}: {package} imports {module}")
    assert not bad, "\n".join(bad)


def test_the_rule_itself_can_fail(tmp_path: Path) -> None:
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from modelward.cli import main\n    import agent._child\n")
    assert [m for _, m in _imports(f)] == ["modelward.cli", "agent._child"]

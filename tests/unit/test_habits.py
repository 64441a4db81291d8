"""Code habits the project keeps (README, Architecture): short functions, or a stated reason."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "mpisplit"
MAX_LINES = 60


def test_long_functions_say_why() -> None:
    """A function over 60 lines says "Long on purpose" and why in its docstring."""
    unexplained = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
                and node.end_lineno - node.lineno + 1 > MAX_LINES
                and "Long on purpose" not in (ast.get_docstring(node) or "")
            ):
                unexplained.append(
                    f"{path.relative_to(PACKAGE.parent)}:{node.lineno} "
                    f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
                )
    assert not unexplained, "\n".join(unexplained)

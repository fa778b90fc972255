"""The packages' dependency rules, checked on the source (imports inside functions included).

Data flows one way: ``recsys`` (the model) knows nothing of Kafka, HTTP or SQL; the shared core ``persona`` knows
the model and the store, never ``streaming`` or ``serving``; those two never import each other; only the command
line (``persona_cli``) sits above them all.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: package -> top-level modules it must never import
FORBIDDEN: dict[str, set[str]] = {
    "recsys": {
        "persona",
        "persona_cli",
        "streaming",
        "serving",
        "kafka",
        "fastapi",
        "starlette",
        "uvicorn",
        "httpx",
        "sqlalchemy",
        "alembic",
        "prometheus_client",
    },
    "persona": {"persona_cli", "streaming", "serving", "kafka", "fastapi", "starlette", "uvicorn"},
    "streaming": {"persona_cli", "serving", "fastapi", "starlette", "uvicorn"},
    "serving": {"persona_cli", "streaming", "kafka"},
}


def imported_top_levels(path: Path) -> dict[str, int]:
    """Top-level module of every absolute import in a file -> the first line importing it."""
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__" and node.args:
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                names = [first.value]
            elif isinstance(first, ast.JoinedStr) and first.values and isinstance(first.values[0], ast.Constant):
                names = [str(first.values[0].value)]
        for name in names:
            found.setdefault(name.split(".")[0], node.lineno)
    return found


def test_the_checker_sees_imports_inside_functions(tmp_path: Path) -> None:
    """A lazy import is still an import: the rule must not be dodged by moving it into a function."""
    module = tmp_path / "m.py"
    module.write_text("import os\n\ndef f():\n    from serving.app import create_app\n    __import__(f'streaming.x')\n")
    assert imported_top_levels(module) == {"os": 1, "serving": 4, "streaming": 5}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_packages_import_only_downwards(package: str) -> None:
    violations = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in sorted((ROOT / package).rglob("*.py"))
        for module, line in imported_top_levels(path).items()
        if module in FORBIDDEN[package]
    ]
    assert not violations, "\n".join(violations)

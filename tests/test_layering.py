"""The layering of the library: ``solvers`` (numerics) < ``backends`` (models) < ``training`` (trainers); the CLIs
(``sample*.py``, ``bench/``, ``tools/``, ``scripts/``) sit on top and nothing below imports them.

Imports are read from the source (module level and inside functions alike); only what runs under
``if __name__ == "__main__":`` is exempt, which is how ``python -m solvers.bench`` / ``solvers.table`` stay aliases
of the CLIs that moved out of ``solvers``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLIS = {"sample", "sample_sd3", "sample_flux", "scripts", "bench", "tools", "tests"}
FORBIDDEN = {
    "safeio": {"solvers", "backends", "training"} | CLIS,
    "solvers": {"backends", "training"} | CLIS,
    "backends": {"training"} | CLIS,
    "training": CLIS,
}


def _is_main_guard(node: ast.AST) -> bool:
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__")


def imported_packages(path: Path) -> set[tuple[str, int]]:
    """Top-level names of every absolute import in ``path`` outside ``if __name__ == "__main__"`` blocks."""
    found: set[tuple[str, int]] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if _is_main_guard(child):
                continue
            if isinstance(child, ast.Import):
                found.update((alias.name.split(".")[0], child.lineno) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                found.add((child.module.split(".")[0], child.lineno))
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    return found


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_no_layer_imports_one_above_it(layer):
    wrong = [f"{path.relative_to(ROOT)}:{line} imports {name}"
             for path in sorted((ROOT / layer).rglob("*.py"))
             for name, line in sorted(imported_packages(path)) if name in FORBIDDEN[layer]]
    assert not wrong, "\n".join(wrong)


def test_the_checker_sees_function_level_imports_and_skips_main_guards(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import os\n\ndef f():\n    from backends import load_backend\n\n"
                      "if __name__ == '__main__':\n    from tools.table_cli import main\n")
    assert {name for name, _ in imported_packages(source)} == {"os", "backends"}

"""The research scripts in studies/ use only the package's public API: every name they import from ase_bptt is
in its module's ``__all__``, they reach no private member (``obj._name``), and they import no sibling script
(no ``sys.path`` edits; what they share lives in ``studies.common``)."""

from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path

import pytest

STUDIES = Path(__file__).resolve().parents[1] / "studies"
SCRIPTS = sorted(STUDIES.glob("*.py"))


def is_script(module: str) -> bool:
    """A study with a ``__main__`` block (the shared helpers have none)."""
    return "__main__" in (STUDIES / f"{module.split('.', 1)[1]}.py").read_text()


def test_there_are_studies():
    assert len(SCRIPTS) >= 8


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_a_study_imports_public_names_only(script):
    tree = ast.parse(script.read_text())
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ase_bptt"):
            module = importlib.import_module(node.module)
            public = set(getattr(module, "__all__", ()))
            problems += [
                f"{node.module}.{a.name} (line {node.lineno})"
                for a in node.names
                if a.name not in public and importlib.util.find_spec(f"{node.module}.{a.name}") is None  # a module
            ]
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            problems.append(f"private member .{node.attr} (line {node.lineno})")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("studies.") and is_script(node.module):
            problems.append(f"{node.module} (line {node.lineno}): a script imports another; share it in studies.common")
        elif isinstance(node, ast.Attribute) and node.attr == "path" and getattr(node.value, "id", "") == "sys":
            problems.append(f"sys.path (line {node.lineno}): import the package, not a sibling script")
    assert not problems, f"{script.name}: " + "; ".join(problems)

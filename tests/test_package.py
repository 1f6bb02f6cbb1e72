"""Package-wide rules: one error base, no import cycles, modules of a readable size."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import ase_bptt
from ase_bptt.errors import AseBpttError

PACKAGE = Path(ase_bptt.__file__).parent
#: Modules stay small enough to read in one sitting (the brief: under ~500 lines).
MAX_MODULE_LINES = 500


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _module_level_imports(path: Path, known: set[str]) -> set[str]:
    """ase_bptt modules imported at module level (imports inside functions and TYPE_CHECKING blocks are lazy)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module} & known
            found |= {f"{node.module}.{a.name}" for a in node.names} & known
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names} & known
    return found


def test_no_import_cycles():
    modules = _modules()
    graph = {name: _module_level_imports(path, set(modules)) - {name} for name, path in modules.items()}

    def reaches(start: str, target: str) -> bool:
        stack, seen = [start], set()
        while stack:
            node = stack.pop()
            for dep in graph[node]:
                if dep == target:
                    return True
                if dep not in seen:
                    seen.add(dep)
                    stack.append(dep)
        return False

    cycles = sorted(name for name in graph if reaches(name, name))
    assert not cycles, f"modules on an import cycle: {cycles}"


def test_modules_are_small():
    too_long = {
        name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not too_long, f"modules over {MAX_MODULE_LINES} lines: {too_long}"


#: The longest function body (its docstring left out) a module may hold.
MAX_FUNCTION_LINES = 80


def test_functions_are_short():
    import ast

    too_long = {}
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = node.body[1:] if ast.get_docstring(node) is not None else node.body
                if body and (n := body[-1].end_lineno - body[0].lineno + 1) > MAX_FUNCTION_LINES:
                    too_long[f"{name}.{node.name}"] = n
    assert not too_long, f"function bodies over {MAX_FUNCTION_LINES} lines: {too_long}"


def test_every_public_error_derives_from_the_base():
    offenders = []
    for info in pkgutil.walk_packages(ase_bptt.__path__, "ase_bptt."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if name.startswith("_") or cls.__module__ != module.__name__:
                continue
            # Warnings are not errors: they keep the stdlib Warning base so `warnings` filters apply.
            if issubclass(cls, Exception) and not issubclass(cls, (AseBpttError, Warning)):
                offenders.append(f"{module.__name__}.{name}")
    assert not offenders, f"public exceptions outside AseBpttError: {offenders}"


def test_lazy_exports_are_the_named_objects_even_after_their_modules_are_imported():
    """A lazy export named like a submodule of its package would become that module once the submodule is
    imported (``from ase_bptt.train import finetune`` returned the module): no package may have one."""
    packages = [m for m in _modules() if _modules()[m].name == "__init__.py"]
    checked = 0
    for name in packages:
        package = importlib.import_module(name)
        for export, module in getattr(package, "_LAZY", {}).items():
            importlib.import_module(module)  # as the CLI and other modules do, before a user's import
            obj = getattr(package, export)
            assert not inspect.ismodule(obj), f"{name}.{export} is the module {obj.__name__}"
            assert obj is getattr(importlib.import_module(module), export)
            checked += 1
    assert checked > 20

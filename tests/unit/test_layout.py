"""The tree is the architecture: where code runs decides what it may import (see README "Development")."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

RUNNER = REPO / "runner"
PACKAGES = ("input", "driver", "cluster", "generation", "store", "report")
# the cluster, and the worker actor's shell (and how it fetches its rows from the object store)
RAY_ALLOWED = ("runner/cluster/", "runner/generation/worker.py", "runner/generation/fetch.py")
NO_TORCH = (
    "runner/input/",
    "runner/driver/",
    "runner/cluster/",
    "runner/store/",
    "runner/report/",
    *(f"runner/{m}.py" for m in ("config", "constraints", "errors", "tasks", "plan", "secrets", "cli", "faults")),
)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in a file, at any depth (imports inside functions included)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return found


def sources(*roots: str) -> list[Path]:
    return sorted(p for root in roots for p in (REPO / root).rglob("*.py"))


def where(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


@pytest.mark.parametrize(
    "module",
    [
        "runner.input",
        "runner.driver",
        "runner.cluster",
        "runner.store",
        "runner.report",
        "runner.plan",
        "runner.config",
    ],
)
def test_the_driver_side_imports_without_torch(module):
    code = f"import sys; import {module}; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert result.stdout.strip() == "[]", f"importing {module} imports {result.stdout.strip()}"


def test_the_engine_imports_without_ray():
    code = "import sys; import runner.generation.engine; print('ray' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert result.stdout.strip() == "False"


def test_only_the_cluster_and_the_worker_shell_import_ray():
    offenders = [
        f"{where(p)}:{line}"
        for p in sources("runner")
        if not where(p).startswith(RAY_ALLOWED)
        for line, name in imported_modules(p)
        if name == "ray" or name.startswith("ray.")
    ]
    assert offenders == []


def test_the_driver_side_never_imports_torch_even_inside_a_function():
    offenders = [
        f"{where(p)}:{line} imports {name}"
        for p in sources(*NO_TORCH)
        for line, name in imported_modules(p)
        if name == "torch" or name.startswith("torch.")
    ]
    assert offenders == []


def face_violations(path: Path, own: str | None) -> list[str]:
    """Imports of another package's insides: `runner.P.x` as a module, or a name `runner.P` does not export."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules, names = [a.name for a in node.names], []
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules, names = [node.module], [a.name for a in node.names]
        else:
            continue
        for module in modules:
            parts = module.split(".")
            if len(parts) < 2 or parts[0] != "runner" or parts[1] not in PACKAGES or parts[1] == own:
                continue
            face = __import__(f"runner.{parts[1]}", fromlist=["_"]).__all__
            if len(parts) > 2:
                found.append(f"{where(path)}:{node.lineno} imports {module}")
            found += [f"{where(path)}:{node.lineno} imports {module}.{n}" for n in names if n not in face]
    return found


def test_code_outside_a_package_uses_only_its_public_face():
    """`from runner.store import write_shard`, never `from runner.store.output import write_shard` from outside."""
    offenders = []
    for p in sources("runner", "jobs"):
        own = where(p).split("/")[1] if where(p).startswith("runner/") and p.parent != RUNNER else None
        offenders += face_violations(p, own)
    assert offenders == []


def test_every_package_names_its_public_face():
    for package in PACKAGES:
        module = __import__(f"runner.{package}", fromlist=["_"])
        assert module.__doc__ and module.__all__, f"runner/{package}/__init__.py: no docstring or __all__"
        missing = [name for name in module.__all__ if not hasattr(module, name)]
        assert missing == [], f"runner.{package}.__all__ names what it does not hold: {missing}"

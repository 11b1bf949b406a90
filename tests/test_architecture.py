"""The shape of the code: layers, cycles, function length, the typed API.

The layers contract itself (imports point down, ``source`` and ``repo``
independent, every module in a layer) is import-linter's, run by the test
command (``lint-imports``); these tests add what it does not check.
"""

from __future__ import annotations

import ast
import gc
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "cbt"
README = Path(__file__).resolve().parents[1] / "README.md"
LAYERS = ["cli", "api", "jobs", "ops", "source", "repo", "format", "core"]
MAX_LINES = 60


def _parse(path: Path) -> ast.Module:
    """``ast.parse`` with the collector held off: on Python 3.11.7 a finalizer run by the
    collector mid-parse that formats a traceback (which parses source itself) makes the
    outer parse fail with "AST constructor recursion depth mismatch" (seen in CI, set off
    by an earlier test's garbage)."""
    gc.collect()
    gc.disable()
    try:
        return ast.parse(path.read_text())
    finally:
        gc.enable()


def _modules() -> dict[str, Path]:
    out = {}
    for p in SRC.rglob("*.py"):
        parts = p.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def _imports(name: str, path: Path) -> set[str]:
    """Every cbt module ``name`` imports, at any depth (inside functions too), and
    every module named to ``importlib.import_module``."""
    tree = _parse(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names)  # submodules imported by name
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.add(node.args[0].value)
    return {m for m in found if m == "cbt" or m.startswith("cbt.")}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        targets = set()
        for m in _imports(name, path):
            while m not in mods and "." in m:  # ``from cbt.x import name`` -> cbt.x
                m = m.rpartition(".")[0]
            if m in mods and m != name:
                targets.add(m)
        graph[name] = targets
    return graph


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def test_every_module_lives_in_a_layer() -> None:
    strays = [m for m in _modules() if _layer(m) is None
              and m not in ("cbt", "cbt.__main__")]
    assert strays == []


def test_no_import_points_up_even_inside_functions_or_through_importlib() -> None:
    """Our own scan of the same rule import-linter checks, extended to
    ``importlib.import_module`` names, which import-linter cannot see."""
    up = []
    for src, targets in _graph().items():
        ls = _layer(src)
        for dst in targets:
            ld = _layer(dst)
            if ls is None or ld is None:
                continue
            same_row = {LAYERS[ls], LAYERS[ld]} == {"source", "repo"}
            if ld < ls or same_row:
                up.append(f"{src} -> {dst}")
    assert up == []


def test_no_import_cycle() -> None:
    """Strongly connected components of the module graph (imports inside functions
    and a package's own ``__init__`` count) all have one module."""
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert cycles == []


def test_the_import_scan_sees_function_level_and_importlib_imports(tmp_path: Path) -> None:
    """The scan the rules above rest on finds imports hidden inside functions and
    module names given to importlib."""
    p = tmp_path / "x.py"
    p.write_text("def f():\n    from cbt.cli import main\n"
                 "def g():\n    import importlib\n    importlib.import_module('cbt.api')\n")
    assert {"cbt.cli.main", "cbt.api"} <= _imports("cbt.core.x", p)


@pytest.mark.parametrize("layer", ["ops", "jobs"])
def test_no_long_functions(layer: str) -> None:
    long = []
    for p in sorted((SRC / layer).rglob("*.py")):
        for node in ast.walk(_parse(p)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > MAX_LINES:
                    long.append(f"{p.relative_to(SRC)}:{node.lineno} {node.name} ({n} lines)")
    assert long == []


def test_readme_api_snippet_passes_mypy_strict(tmp_path: Path) -> None:
    """The Python API as the README shows it type-checks under ``mypy --strict``:
    every name resolves to a real type (no ``Any``, no ``object``)."""
    text = README.read_text()
    section = text[text.index("## Python API"):]
    snippet = re.search(r"```python\n(.*?)```", section, re.S)
    assert snippet is not None
    script = tmp_path / "user_script.py"
    script.write_text(snippet.group(1) + _REVEAL)
    # pyarrow, blake3 and lz4 ship no type information: a user's config says so, as ours
    # does (pyproject.toml's [[tool.mypy.overrides]])
    config = tmp_path / "mypy.ini"
    config.write_text("[mypy]\nstrict = True\n"
                      "[mypy-pyarrow.*,pyarrow,blake3,lz4,lz4.*]\nignore_missing_imports = True\n")
    env = {**os.environ, "MYPYPATH": str(SRC.parent)}
    proc = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(config),
                           "--no-incremental", "--cache-dir", str(tmp_path / "mypy-cache"),
                           str(script)],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    revealed = re.findall(r'Revealed type is "([^"]*)"', proc.stdout)
    assert revealed and not any(t in ("Any", "builtins.object") for t in revealed), revealed


# What the snippet's names must resolve to (checked by reveal_type: not Any, not object).
_REVEAL = """
reveal_type(m)
reveal_type(cs)
reveal_type(vault)
reveal_type(point)
reveal_type(restored)
reveal_type(report)
reveal_type(results)
reveal_type(cbt.jobs.run)
reveal_type(cbt.diff)
"""

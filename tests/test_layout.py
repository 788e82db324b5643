"""The package's shape: folders are packages, every module imports on its own, no import cycle, no module
name used twice, core and runtime stay below the capability packages."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sparsec"
CAPABILITIES = ("weights", "channels", "transformer", "encoding")


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every .py under sparsec/."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the sparsec modules it imports, at module level or inside functions (relative imports
    resolved; `from pkg import name` counts as pkg.name when that is a module, else as pkg)."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:
                    deps.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    for start in sorted(graph):
        if state.get(start):
            continue
        stack = [(start, iter(sorted(graph[start])))]
        path = [start]
        state[start] = 1
        while stack:
            node, deps = stack[-1]
            dep = next(deps, None)
            if dep is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            elif not state.get(dep):
                state[dep] = 1
                stack.append((dep, iter(sorted(graph[dep]))))
                path.append(dep)
    return None


def test_every_module_imports_first_in_a_fresh_interpreter():
    """Each module imported with no sparsec module loaded yet (third-party modules stay cached, which
    keeps this one subprocess fast)."""
    names = sorted(_modules())
    script = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    for loaded in [m for m in sys.modules if m == 'sparsec' or m.startswith('sparsec.')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as exc:\n"
        "        print(f'{name}: {type(exc).__name__}: {exc}')\n"
    )
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout == "", f"modules that fail to import first:\n{run.stdout}"


def test_import_graph_has_no_cycle():
    graph = _import_graph(_modules())
    assert len(graph) > 40 and sum(map(len, graph.values())) > 100  # the walk really found imports
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_layers_import_downwards():
    """core imports no other sparsec package; runtime imports core only; capability packages never
    import compiler/api/cli/inspection."""
    top = {"sparsec", "sparsec.api", "sparsec.cli", "sparsec.compiler", "sparsec.inspection"}
    wrong = []
    for name, deps in _import_graph(_modules()).items():
        package = name.split(".")[1] if name.count(".") >= 2 else None
        for dep in deps:
            dep_package = dep.split(".")[1] if dep.count(".") >= 2 else None
            if package == "core" and dep_package not in ("core", None):
                wrong.append(f"{name} -> {dep}")
            if package == "runtime" and dep_package not in ("core", "runtime", None):
                wrong.append(f"{name} -> {dep}")
            if package is not None and dep in top:
                wrong.append(f"{name} -> {dep}")
    assert wrong == []


def test_module_basenames_are_unique():
    seen: dict[str, list[str]] = {}
    for name, path in _modules().items():
        if path.name != "__init__.py":
            seen.setdefault(path.stem, []).append(name)
            assert path.stem != path.parent.name, f"{name} is named like its own package"
    assert {k: v for k, v in seen.items() if len(v) > 1} == {}


def test_pyproject_maps_no_package_dirs():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    setuptools = config["tool"]["setuptools"]
    assert "package-dir" not in setuptools and "package-data" not in setuptools
    assert setuptools["packages"]["find"]["include"] == ["sparsec*"]
    folders = {p.parent for p in PACKAGE.rglob("*.py")}
    assert all((f / "__init__.py").is_file() for f in folders)  # find() skips a folder without one

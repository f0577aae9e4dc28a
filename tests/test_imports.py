"""No import cycle anywhere in ``bundle/``, and every module of ``bundle.study`` imports on its own.

The graph is built from the source (AST) of the modules present, so it needs no imports and tolerates packages
being reorganised: only imports executed when a module is imported count (module level, including ``if``/``try``
blocks, but not ``if TYPE_CHECKING:`` blocks or imports inside functions), and imports of modules that do not
exist are ignored.
"""

import ast
import os
import subprocess
import sys
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "bundle"


def _modules(root: str = ROOT, package: str = PACKAGE) -> dict[str, str]:
    """{module name: file} of every .py file under the package (``__init__.py`` is the package itself)."""
    out = {}
    for folder, dirs, files in os.walk(os.path.join(root, package)):
        dirs[:] = [d for d in dirs if not d.startswith((".", "__"))]
        rel = os.path.relpath(folder, root).split(os.sep)
        for f in files:
            if f.endswith(".py"):
                name = rel if f == "__init__.py" else [*rel, f[:-3]]
                out[".".join(name)] = os.path.join(folder, f)
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_time_statements(body):
    """The statements run when the module is imported (not function bodies, not ``if TYPE_CHECKING:``)."""
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                yield from _import_time_statements(node.body)
            yield from _import_time_statements(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                yield from _import_time_statements(block)
        elif isinstance(node, ast.With | ast.ClassDef):
            yield from _import_time_statements(node.body)


def _imports(name: str, path: str, modules: dict[str, str]) -> set[str]:
    """The modules of the package that ``name`` imports when it is imported."""
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
    except (OSError, SyntaxError) as e:  # a file being rewritten by someone else: not this test's business
        warnings.warn(f"import graph: skipped {path} ({e})", stacklevel=1)
        return set()
    is_pkg = os.path.basename(path) == "__init__.py"
    out = set()
    for node in _import_time_statements(tree.body):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            base = node.module or ""
            if node.level:  # relative: from the module's package, one level up per extra dot
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join([*pkg, base] if base else pkg)
            # `from pkg import sub` imports the submodule sub; `from mod import obj` imports mod
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        out |= {t for t in targets if t in modules and t != name}
    return out


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m) :] + [m]
            if m not in state and (cycle := visit(m)):
                return cycle
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (cycle := visit(n)):
            return cycle
    return None


def test_cycle_finder_finds_cycles():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_graph_counts_import_time_imports_only(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from pkg.sub.b import g\n")
    (pkg / "a.py").write_text("from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n"
        "def g():\n    from pkg import a\n"
        "try:\n    from . import c\nexcept ImportError:\n    pass\n"
    )
    (pkg / "sub" / "c.py").write_text("import pkg.a\nimport os\n")
    modules = _modules(str(tmp_path), "pkg")
    assert set(modules) == {"pkg", "pkg.a", "pkg.sub", "pkg.sub.b", "pkg.sub.c"}
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert graph == {
        "pkg": set(),
        "pkg.a": {"pkg.sub.b"},
        "pkg.sub": {"pkg.sub.b"},
        "pkg.sub.b": {"pkg.sub.c"},
        "pkg.sub.c": {"pkg.a"},
    }
    assert _find_cycle(graph) == ["pkg.a", "pkg.sub.b", "pkg.sub.c", "pkg.a"]


def test_no_import_cycle_in_bundle():
    modules = _modules()
    assert "bundle.study.runner" in modules and "bundle.study.report" in modules
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert "bundle.study.runner" in graph["bundle.study.cli"]  # the graph sees `from bundle.study.x import y`
    assert "bundle.study.report" in graph["bundle.study.runner"]
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
    # the report never needs the runner (the runner writes the report at its end, not the other way round)
    seen, todo = set(), ["bundle.study.report"]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += graph.get(m, ())
    assert "bundle.study.runner" not in seen


def test_each_study_module_imports_first():
    """Every module of bundle.study imported first in a fresh set of bundle modules (catches a module that needs
    another to have been imported before it, which an import cycle through a package __init__ would cause)."""
    names = sorted(n for n in _modules() if n == "bundle.study" or n.startswith("bundle.study."))
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    for m in [m for m in sys.modules if m == 'bundle' or m.startswith('bundle.')]:\n"
        "        del sys.modules[m]\n"
        "    importlib.import_module(name)\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert p.returncode == 0, p.stderr[-3000:]

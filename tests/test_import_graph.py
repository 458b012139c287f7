"""No import circles: neither between modules (counting imports deferred into functions, which
only hide a circle) nor between subpackages; and every module imports in a fresh interpreter."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import hasslefree

SRC = Path(hasslefree.__file__).resolve().parent
PACKAGE = "hasslefree"


def module_files() -> dict[str, tuple[Path, bool]]:
    """Dotted module name → (file, is a package ``__init__``)."""
    found = {}
    for path in SRC.rglob("*.py"):
        parts = [PACKAGE, *path.relative_to(SRC).with_suffix("").parts]
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def _imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: set[str]) -> set[str]:
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level:
            base = module.split(".") if is_package else module.split(".")[:-1]
            base = base[: len(base) - node.level + 1]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        names = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in known else prefix for a in node.names]
    return {n for n in names if n in known}


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test)


def import_graph() -> dict[str, set[str]]:
    """Every import of ours anywhere in each module (module level or inside functions), except
    ``if TYPE_CHECKING:`` blocks, which never run."""
    files = module_files()
    known = set(files)
    graph: dict[str, set[str]] = {}
    for module, (path, is_package) in files.items():
        edges: set[str] = set()
        stack: list[ast.AST] = [ast.parse(path.read_text(), filename=str(path))]
        while stack:
            node = stack.pop()
            if _type_checking_only(node):
                continue
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges |= _imported(node, module, is_package, known)
            stack.extend(ast.iter_child_nodes(node))
        graph[module] = edges - {module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def unit(module: str) -> str:
    """The subpackage (``hasslefree.checkpoint``) or top-level module a module belongs to."""
    return ".".join(module.split(".")[:2])


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_itself_back():
    graph = import_graph()
    assert len(graph) > 50 and graph["hasslefree.pipeline.api"], "the graph was not built"
    assert cycles(graph) == []


def test_no_subpackage_imports_itself_back():
    packages: dict[str, set[str]] = {}
    for module, edges in import_graph().items():
        if module == PACKAGE:  # the root re-exports; nothing of ours imports it
            continue
        packages.setdefault(unit(module), set()).update(unit(e) for e in edges if unit(e) != unit(module))
    assert PACKAGE not in set().union(*packages.values()), "a module imports the package root"
    packages = {k: v - {PACKAGE} for k, v in packages.items()}
    assert cycles(packages) == []


def test_every_module_imports_in_a_fresh_interpreter():
    modules = sorted(module_files())
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    done = subprocess.run([sys.executable, "-c", code, *modules], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]

"""The package's shape, read from its source with `ast` (nothing imported): imports run one way (no cycle between
adacache modules, imports inside functions included), no module reaches for another's `_private` names, no source
file grows past 800 lines, and there is one PSNR."""

import ast
from pathlib import Path

import pytest

import adacache

SRC = Path(adacache.__file__).parent
MAX_LINES = 800


def _modules() -> dict[str, tuple[Path, bool]]:
    """Module name -> (file, is a package's __init__)."""
    modules = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = ["adacache", *path.relative_to(SRC).with_suffix("").parts]
        package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if package else parts)] = (path, package)
    return modules


MODULES = _modules()


def _target(module: str, node: ast.ImportFrom) -> str:
    """The module a `from ... import` names, relative imports resolved."""
    if not node.level:
        return node.module or ""
    _, package = MODULES[module]
    base = module.split(".") if package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _ours(name: str) -> bool:
    return name == "adacache" or name.startswith("adacache.")


def _read(module: str) -> tuple[set[str], list[str]]:
    """The adacache modules `module` imports (anywhere in it: module level, functions, TYPE_CHECKING blocks), and
    the other modules' private names it uses, as "line: what"."""
    path, _ = MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    imports: set[str] = set()
    private: list[str] = []
    bound: set[str] = set()  # local names bound to adacache modules: `from . import compat`, `import adacache.x as x`
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            target = _target(module, node)
            if not _ours(target):
                continue
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                if submodule in MODULES:  # `from . import x` where x is a module
                    imports.add(submodule)
                    bound.add(alias.asname or alias.name)
                else:
                    imports.add(target)
                    if _private(alias.name):
                        private.append(f"{node.lineno}: from {target} import {alias.name}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if _ours(alias.name):
                    imports.add(alias.name)
                    bound.add(alias.asname or alias.name.split(".")[0])
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            root = node.value
            while isinstance(root, ast.Attribute):  # adacache.cli._x
                root = root.value
            if isinstance(root, ast.Name) and root.id in bound:
                private.append(f"{node.lineno}: {ast.unparse(node)}")
    imports.discard(module)
    return imports & set(MODULES), private


GRAPH = {module: _read(module) for module in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for neighbour in sorted(graph[node]):
            if neighbour not in index:
                visit(neighbour)
                low[node] = min(low[node], low[neighbour])
            elif neighbour in on_stack:
                low[node] = min(low[node], index[neighbour])
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

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_reader_sees_imports_inside_functions_and_relative_ones():
    assert "adacache.pipelines" in GRAPH["adacache.cli"][0]  # `from . import pipelines`
    assert "adacache.evaluation.metrics" in GRAPH["adacache.cli"][0]  # inside a function
    assert "adacache.compat" in GRAPH["adacache.evaluation.methods"][0]  # `from .. import compat`
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_between_adacache_modules():
    assert _cycles({module: imports for module, (imports, _) in GRAPH.items()}) == []


def test_imports_run_one_way_from_the_entry_points():
    """cli -> pipelines, serve -> pipelines, evaluation -> pipelines; the page never imports the command line, and
    nothing below them imports an entry point."""
    entry_points = {"adacache.cli", "adacache.serve", "adacache.demo"}
    assert "adacache.cli" not in GRAPH["adacache.serve"][0]
    for module in ("adacache.cli", "adacache.serve", "adacache.demo", "adacache.evaluation.bench",
                   "adacache.evaluation.calibrate", "adacache.evaluation.methods"):
        assert "adacache.pipelines" in GRAPH[module][0], module
    for module, (imports, _) in GRAPH.items():
        if module not in entry_points:
            assert not imports & entry_points, module


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_uses_another_modules_private_names(module):
    assert GRAPH[module][1] == []


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda path: str(path.relative_to(SRC)))
def test_no_source_file_is_over_800_lines(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(SRC)} has {lines} lines; split it by role"


def test_one_psnr_and_one_ssim():
    for name in ("psnr", "ssim"):
        defined = [f"{path.relative_to(SRC)}:{node.lineno}" for path in SRC.rglob("*.py")
                   for node in ast.walk(ast.parse(path.read_text()))
                   if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name]
        assert [place.split(":")[0] for place in defined] == ["evaluation/metrics.py"], defined

"""The package's import graph: no cycles between modules, and no imports inside functions except optional extras.

A cycle is usually closed by an import inside a function (the import at the top would fail): such a module pair
has one job split between them. Imports under `if TYPE_CHECKING:` are for annotations only and never run: left out.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).parent.parent / "stablerl"

# cycles still there, each to be cut (issue 28): the coordinator removes an entry once its cycle is gone, and the
# test fails if an entry is no longer a cycle (so the list only shrinks)
KNOWN_CYCLES: list[set[str]] = []


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports(path: Path, modules: set[str]) -> list[tuple[str, int, bool]]:
    """(imported stablerl module, line, inside a function) for each import in the file, TYPE_CHECKING blocks left
    out; `from stablerl.pkg import mod` counts as stablerl.pkg.mod when that is a module."""
    out = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if _type_checking(child):
                continue
            inner = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            names = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                names = [f"{child.module}.{a.name}" if f"{child.module}.{a.name}" in modules else child.module
                         for a in child.names]
            out.extend((n, child.lineno, in_function) for n in names if n in modules)
            visit(child, inner)

    visit(ast.parse(path.read_text()), False)
    return out


def found() -> dict[str, list[tuple[str, int, bool]]]:
    """Each stablerl module -> its imports of other stablerl modules (packages' __init__ left out: they are docs)."""
    files = {_module(p): p for p in ROOT.rglob("*.py")}
    return {m: [i for i in imports(p, set(files)) if i[0] != m and files[i[0]].name != "__init__.py"]
            for m, p in files.items()}


def cycles(edges: dict[str, set[str]]) -> list[set[str]]:
    """The groups of modules that import each other, directly or through others (strongly connected, > 1)."""
    reach = {}
    for m in edges:
        seen, todo = set(), [m]
        while todo:
            for n in edges.get(todo.pop(), ()):
                if n not in seen:
                    seen.add(n)
                    todo.append(n)
        reach[m] = seen
    groups = []
    for m in edges:
        group = {m} | {n for n in reach[m] if m in reach[n]}
        if len(group) > 1 and group not in groups:
            groups.append(group)
    return groups


def test_no_import_cycles_beyond_the_known_ones():
    graph = {m: {n for n, _, _ in imps} for m, imps in found().items()}
    cycles_now = cycles(graph)
    new = [sorted(c) for c in cycles_now if c not in KNOWN_CYCLES]
    assert not new, f"import cycles: {new}"
    gone = [sorted(c) for c in KNOWN_CYCLES if c not in cycles_now]
    assert not gone, f"no longer a cycle, remove from KNOWN_CYCLES: {gone}"

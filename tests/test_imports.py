"""The import rules of zigmem/, read from its source with ast: only _binding imports the
compiled extension, and no module imports one that imports it back (also through imports
inside functions), so the layers the README describes are the ones the imports show.
Imports under ``if TYPE_CHECKING:`` are for the type checker only (they never run), so
they are not part of the layers."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "zigmem"


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and (
        (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING")
        or (isinstance(node.test, ast.Attribute) and node.test.attr == "TYPE_CHECKING"))


def runtime_nodes(tree: ast.AST):
    """Every node of ``tree`` except the bodies of ``if TYPE_CHECKING:`` blocks."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if is_type_checking(child):
                todo.extend(child.orelse)  # an else branch runs
            else:
                todo.append(child)


def imports_of(path: pathlib.Path) -> set[str]:
    """zigmem modules ``path`` imports when it runs, at any depth of its code."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("zigmem")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("zigmem"):
                continue
            for alias in node.names:  # `from . import x` imports the module x
                sub = f"{target}.{alias.name}"
                found.add(sub if (PACKAGE.parent / (sub.replace(".", "/") + ".py")).exists()
                          or (PACKAGE.parent / sub.replace(".", "/")).is_dir() else target)
    return {m for m in found if m != name}


GRAPH = {module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py")}


def test_only_the_binding_imports_the_extension():
    importers = sorted(m for m, deps in GRAPH.items() if "zigmem._zigmem" in deps)
    assert importers == ["zigmem._binding"]


def test_no_import_cycles():
    # The package's __init__ re-exports everything; it is the root, not a layer.
    graph = {m: {d for d in deps if d in GRAPH and not GRAPH.get(d) is None
                 and d not in ("zigmem", "zigmem.weights", "zigmem.demo")}
             for m, deps in GRAPH.items() if m not in ("zigmem", "zigmem.weights", "zigmem.demo")}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m):
        state[m] = 1
        path.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(d):] + [d]))
            if d not in state:
                visit(d)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_parsers_know_only_tensor_info():
    for parser in ("zigmem.weights.gguf", "zigmem.weights.safetensors"):
        assert not GRAPH[parser] & {"zigmem.weights.file", "zigmem.weights.quantized_matrix"}


def test_type_checking_imports_do_not_count():
    tree = ast.parse("from typing import TYPE_CHECKING\nimport zigmem.a\n"
                     "if TYPE_CHECKING:\n    import zigmem.b\nelse:\n    import zigmem.c\n"
                     "def f():\n    import zigmem.d\n")
    names = {a.name for n in runtime_nodes(tree) if isinstance(n, ast.Import) for a in n.names}
    assert names == {"zigmem.a", "zigmem.c", "zigmem.d"}


def test_the_core_does_not_import_the_demo():
    for m, deps in GRAPH.items():
        if not m.startswith("zigmem.demo"):
            assert not any(d.startswith("zigmem.demo") for d in deps), m

"""The import rules of zigmem/, read from its source with ast: only _binding imports the
compiled extension, and no module imports one that imports it back (also through imports
inside functions), so the layers the README describes are the ones the imports show."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "zigmem"


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: pathlib.Path) -> set[str]:
    """zigmem modules ``path`` imports, at any depth of its code."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
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


def test_the_core_does_not_import_the_demo():
    for m, deps in GRAPH.items():
        if not m.startswith("zigmem.demo"):
            assert not any(d.startswith("zigmem.demo") for d in deps), m

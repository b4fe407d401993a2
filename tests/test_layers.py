"""Imports point down the layers of the design, and no module imports itself back (no cycle)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "tdastore"
# lowest first; a module may import its own component and any component of a lower layer
LAYERS = [
    ["errors", "version", "atomic"],
    ["devices"],
    ["config", "methods"],
    ["tasks"],
    ["training", "optim"],
    ["grads"],
    ["store"],
    ["precond"],
    ["index", "distributed"],
    ["attribution", "groundtruth"],
    ["evaluate"],
    ["demo_text"],
    ["quickstart", "serve", "plan"],
    ["cli", "__init__"],
    ["__main__"],
]
LAYER = {component: level for level, names in enumerate(LAYERS) for component in names}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def component(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports(path: Path) -> set[str]:
    """Every tdastore module a file imports, at top level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "tdastore"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "tdastore":
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}  # `from pkg import module`
    return found


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in imports(path) if m in files and m != name} for name, path in files.items()}


def test_every_component_has_a_layer():
    assert {component(m) for m in graph()} <= set(LAYER)


def test_imports_point_down():
    wrong = []
    for module, targets in graph().items():
        for target in targets:
            source, dest = component(module), component(target)
            if source != dest and LAYER[dest] >= LAYER[source]:
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports against the layer order:\n" + "\n".join(sorted(wrong))


def test_no_import_cycles():
    edges = graph()
    # a package imports its own submodules (its __init__), so package -> child edges are not cycles
    edges = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in edges.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)

"""The package's shape: no import cycle between moefx modules, and no module imports a later stage.

Read from the source with ``ast`` (every import statement, function-local ones included), so a
loop held together by a deferred import fails here too.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "moefx"

# what each part may import from moefx (by module-name prefix); everything above is free to import below
ALLOWED = {
    "moefx.op": (),
    "moefx.runtime": (),
    "moefx.ffn": (),
    "moefx.layer": ("moefx.op",),
    "moefx.cpu": ("moefx.op",),
    "moefx.codegen": ("moefx.op", "moefx.codegen"),
    "moefx.fit": ("moefx.op", "moefx.layer", "moefx.ffn", "moefx.runtime", "moefx.fit"),
    "moefx.recipe": ("moefx.fit",),
    "moefx.compile": ("moefx.op", "moefx.compile"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """moefx modules ``name`` imports; importing a.b.c also initialises the package a.b (unless ``name`` is in it)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            parts = target.split(".")
            for i in range(2, len(parts) + 1):
                module = ".".join(parts[:i])
                if module in known and not (name == module or name.startswith(module + ".")):
                    found.add(module)  # an ancestor package of ``name`` is already initialising
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, set(known)) for name, path in known.items()}


def test_no_import_cycle_between_moefx_modules():
    edges = graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)


def test_lower_layers_do_not_import_upward():
    wrong = []
    for name, imported in graph().items():
        rule = next((prefix for prefix in sorted(ALLOWED, key=len, reverse=True)
                     if name == prefix or name.startswith(prefix + ".")), None)
        if rule is None:
            continue
        for target in imported:
            if not any(target == ok or target.startswith(ok + ".") for ok in ALLOWED[rule]):
                wrong.append(f"{name} imports {target}")
    assert not wrong, wrong


def test_the_op_schema_is_spelled_once():
    """Every module that registers or calls the flat op goes through MoEInputs/MoEAttrs: no literal argument list."""
    spelled = [name for name, path in modules().items()
               if "const_experts, top_k, activation, gated, scoring" in " ".join(path.read_text().split())]
    assert spelled == [], spelled

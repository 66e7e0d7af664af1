"""The package's import graph, read with ``ast``: acyclic, and no import hidden inside a function.

A function-local import of one of our own modules is how a cycle hides (it runs only once both
modules exist); only optional third-party dependencies may be imported late, so that the package
imports without them. Edges are the modules an import statement names; the implicit import of a
parent package (``llama2_lightning/__init__.py``) is not an edge, since Python runs it first anyway.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "llama2_lightning"
# Optional dependencies, imported where they are used so the package works without them.
OPTIONAL = {"bitsandbytes", "matplotlib", "wandb", "transformers", "gguf", "accelerate", "safetensors", "peft"}
# Required third-party modules a package module imports late, each for a stated reason.
LATE = {
    # the entry point's other commands (convert, chat, score...) start without importing Lightning
    "llama2_lightning.cli": {"jsonargparse", "lightning"},
    # the compiler stack is loaded only when a decode step is compiled
    "llama2_lightning.generation": {"torch._inductor", "torch._dynamo"},
    # torch's fake process group is a testing module, loaded only to estimate a config's memory
    "llama2_lightning.memory_estimate": {"torch.testing._internal.distributed.fake_pg"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_names(node: ast.Import | ast.ImportFrom, importer: str) -> Iterator[str]:
    """The absolute dotted names an import statement binds (a ``from`` import's names tried as submodules)."""
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names)
        return
    base = node.module or ""
    if node.level:  # relative: from the importer's package
        package = importer.split(".")
        if not MODULES[importer].name == "__init__.py":
            package = package[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join([*package, base] if base else package)
    for alias in node.names:
        yield f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base


def own_module(name: str) -> str | None:
    """The package module that ``name`` is or lies in, or None for a third-party name."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def module_level_imports(tree: ast.Module) -> Iterator[ast.Import | ast.ImportFrom]:
    """Imports that run when the module is imported: its body, and inside top-level if/try blocks."""
    stack: list[ast.stmt] = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.If, ast.Try)):
            stack += [*node.body, *node.orelse, *getattr(node, "finalbody", []),
                      *(s for h in getattr(node, "handlers", []) for s in h.body)]


def local_imports(tree: ast.Module) -> Iterator[tuple[str, ast.Import | ast.ImportFrom]]:
    """(enclosing def or class, import) for every import that does not run at module import time."""
    top = {id(node) for node in module_level_imports(tree)}

    def walk(node: ast.AST, scope: str) -> Iterator[tuple[str, ast.Import | ast.ImportFrom]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)) and id(child) not in top:
                yield scope, child
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) else scope
            yield from walk(child, inner)

    yield from walk(tree, "<module>")


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        targets = {own_module(n) for node in module_level_imports(tree) for n in imported_names(node, name)}
        graph[name] = {t for t in targets if t is not None and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path ``[a, b, ..., a]``, or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_walk_sees_the_package_and_its_edges() -> None:
    graph = import_graph()
    assert len(graph) > 40 and "llama2_lightning.modules.rlhf" in graph
    # a known edge each way of writing an import, so an empty graph cannot pass the tests below
    assert "llama2_lightning.rlhf.experience" in graph["llama2_lightning.modules.rlhf"]
    assert "llama2_lightning.model" in graph["llama2_lightning.generation"]


def test_cycle_finder_finds_a_planted_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_import_graph_is_acyclic() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_function_local_import_of_the_package_or_a_required_dependency(name: str) -> None:
    path = MODULES[name]
    tree = ast.parse(path.read_text(), str(path))
    bad: list[str] = []
    for scope, node in local_imports(tree):
        for target in imported_names(node, name):
            top = target.split(".")[0]
            late = any(target == m or target.startswith(m + ".") for m in LATE.get(name, ()))
            if top == "llama2_lightning" or not (top in OPTIONAL or late):
                line = f"{path.relative_to(PACKAGE.parent)}:{node.lineno} in {scope}(): {target}"
                bad += [line] if line not in bad else []
    assert not bad, "function-local imports (move them to the top, or add an optional dependency to OPTIONAL):\n" \
        + "\n".join(bad)


def test_a_planted_function_local_import_is_seen() -> None:
    tree = ast.parse("import os\nif True:\n    import sys\ndef f():\n    from llama2_lightning import model\n"
                     "class C:\n    def g(self):\n        import wandb\n")
    assert [(scope, n.lineno) for scope, n in local_imports(tree)] == [("f", 5), ("g", 8)]

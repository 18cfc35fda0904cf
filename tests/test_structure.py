"""The layout's rules, checked on the source: one concern per file, imports that point one way.

Every import counts, including those inside functions: no import cycle between modules, data code
never imports model code, training code never imports metrics (nor run) code, and no module outgrows
one concern (about 650 lines).
"""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).parents[1] / "earlyexit"
MAX_LINES = 650


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _runtime_nodes(tree: ast.AST):
    """Every node but those under ``if TYPE_CHECKING:`` (annotations only, never imported at run time)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                todo.extend(child.orelse)
                continue
            todo.append(child)


def _imports() -> dict[str, set[str]]:
    """module -> earlyexit modules it imports (a package import counts as its __init__)."""
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        base = name.split(".") if is_pkg else name.split(".")[:-1]
        deps = set()
        for node in _runtime_nodes(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom):
                root = base[: len(base) - node.level + 1] if node.level else []
                mod = ".".join(root + (node.module.split(".") if node.module else [])) if node.level else node.module
                targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for t in targets:
                if t and t.split(".")[0] == "earlyexit":
                    while t and t not in modules:
                        t = t.rpartition(".")[0]
                    if t and t != name:
                        deps.add(t)
        graph[name] = deps
    return graph


def _package_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Cycles in the module graph, a package's __init__ re-exports of its own submodules excepted."""
    def own_child(a: str, b: str) -> bool:  # a package importing its own submodule is how it exports
        return b.startswith(a + ".")

    edges = {a: {b for b in bs if not own_child(a, b)} for a, bs in graph.items()}
    cycles, state, stack = [], {}, []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(edges.get(n, ())):
            if state.get(m) == 1:
                cycles.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(edges):
        if n not in state:
            visit(n)
    return cycles


def test_no_import_cycles_even_through_function_level_imports():
    assert _package_cycles(_imports()) == []


@pytest.mark.parametrize("src,forbidden", [
    ("earlyexit.data", ("earlyexit.models",)),
    ("earlyexit.training", ("earlyexit.metrics", "earlyexit.runs", "earlyexit.reports")),
    ("earlyexit.metrics", ("earlyexit.models", "earlyexit.training")),
])
def test_imports_point_one_way(src, forbidden):
    bad = [(a, b) for a, bs in _imports().items() if a == src or a.startswith(src + ".")
           for b in bs if any(b == f or b.startswith(f + ".") for f in forbidden)]
    assert bad == []


def test_modules_stay_small():
    big = {str(p.relative_to(PKG)): n for p in PKG.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert big == {}


def test_training_is_a_module_and_train_the_function():
    import importlib

    import earlyexit

    assert importlib.import_module("earlyexit.training").__name__ == "earlyexit.training"
    assert callable(earlyexit.train) and earlyexit.train.__module__ == "earlyexit.training.loop"


def test_nothing_outside_models_asks_which_model_it_is():
    """Backbone classes and architecture names are known only inside models/."""
    classes = ("ResNet", "BasicBlock", "Bottleneck", "CifarStem", "BertHead", "BertMultiExit", "VisionTransformer",
               "MSDNet", "MLP")
    arch_tests = ('startswith("bert', "startswith('bert", '== "resnet', '== "vit', '== "bert', '== "msdnet')
    hits = []
    for p in PKG.rglob("*.py"):
        rel = p.relative_to(PKG)
        if rel.parts[0] == "models":
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance":
                kinds = ast.unparse(node.args[1]) if len(node.args) > 1 else ""
                hits += [f"{rel}: isinstance(..., {c})" for c in classes if c in kinds]
        text = p.read_text()
        hits += [f"{rel}: {t}" for t in arch_tests if t in text]
    assert hits == []

"""The layout's rules, checked on the source: one concern per file, imports that point one way.

Every import counts, including those inside functions: no import cycle between modules, data code
never imports model code, training code never imports metrics (nor run) code, and no module outgrows
one concern (about 650 lines). Importing ``earlyexit.a.b`` runs ``earlyexit/a/__init__.py`` too, so an
import counts as one of the target and of each package above it that the importer is not inside already:
a loop through a package's ``__init__`` is a loop.
"""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).parents[1] / "earlyexit"
MAX_LINES = 650


def _module_name(path: Path, pkg: Path = PKG) -> str:
    parts = list(path.relative_to(pkg.parent).with_suffix("").parts)
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


def _imported_with(target: str, importer: str) -> list[str]:
    """``target`` and the packages above it whose ``__init__`` importing it runs: those the importer is not
    inside (its own packages are imported before it, so importing one of them again runs nothing)."""
    parts = target.split(".")
    out = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return [m for m in out if m != importer and not importer.startswith(m + ".")]


def _imports(pkg: Path = PKG) -> dict[str, set[str]]:
    """module -> earlyexit modules it imports, the ``__init__`` of every package entered on the way included."""
    modules = {_module_name(p, pkg): p for p in pkg.rglob("*.py")}
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
                    if t:
                        deps.update(m for m in _imported_with(t, name) if m in modules)
        graph[name] = deps
    return graph


def _package_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Cycles in the import graph (a package's ``__init__`` importing its own submodules included: that is
    how it exports, and a submodule that imports its way back into the package closes a loop)."""
    edges = graph
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


def _write_package(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        f = root / "earlyexit" / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    return root / "earlyexit"


@pytest.mark.parametrize("files,cycle", [
    # config -> metrics/__init__ (importing metrics.criteria runs it) -> device -> config
    ({"__init__.py": "", "config.py": "def f():\n    from .metrics.criteria import NAMES\n",
      "device.py": "from .config import X\n", "metrics/__init__.py": "from ..device import y\nfrom .criteria import NAMES\n",
      "metrics/criteria.py": "NAMES = ()\n"},
     ["earlyexit.config", "earlyexit.metrics", "earlyexit.device", "earlyexit.config"]),
    # runs -> analysis/__init__ (importing analysis.cosines runs it) -> analysis.report -> runs
    ({"__init__.py": "", "runs.py": "def probe():\n    from .analysis.cosines import record\n",
      "analysis/__init__.py": "from .cosines import record\nfrom .report import analyze\n",
      "analysis/cosines.py": "def record(): pass\n", "analysis/report.py": "def analyze():\n    from ..runs import x\n"},
     ["earlyexit.analysis", "earlyexit.analysis.report", "earlyexit.runs", "earlyexit.analysis"]),
])
def test_the_cycle_check_sees_loops_through_a_package_init(tmp_path, files, cycle):
    assert _package_cycles(_imports(_write_package(tmp_path, files))) == [cycle]


def test_a_package_importing_its_own_submodules_is_no_loop(tmp_path):
    pkg = _write_package(tmp_path, {"__init__.py": "from .a import f\nfrom .sub import h\n",
                                    "a.py": "from . import b\ndef f(): pass\n", "b.py": "",
                                    "sub/__init__.py": "from .c import h\n",
                                    "sub/c.py": "from .. import a\nfrom . import d\ndef h(): pass\n", "sub/d.py": ""})
    assert _package_cycles(_imports(pkg)) == []


@pytest.mark.parametrize("src,forbidden", [
    ("earlyexit.data", ("earlyexit.models",)),
    ("earlyexit.training", ("earlyexit.metrics", "earlyexit.runs", "earlyexit.reports")),
    ("earlyexit.metrics", ("earlyexit.models", "earlyexit.training")),
    ("earlyexit.models", ("earlyexit.metrics",)),  # FLOPs are counted by earlyexit.flops, below both
    ("earlyexit.analysis", ("earlyexit.runs", "earlyexit.analyze", "earlyexit.compare")),  # the run code uses analysis
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


def test_the_public_api_the_type_marker_and_the_main_dependencies():
    """What users expect of a package: the run API at the top level, ``py.typed`` shipped with it, and a plain
    install that writes ``model.safetensors`` (safetensors a main dependency; TensorBoard an extra)."""
    tomllib = pytest.importorskip("tomllib")
    import earlyexit

    for name in ("Results", "RunConfig", "run_experiment", "build_model", "Regime", "train", "evaluate"):
        assert name in earlyexit.__all__ and getattr(earlyexit, name) is not None, name
    assert (PKG / "py.typed").is_file()
    project = tomllib.loads((PKG.parent / "pyproject.toml").read_text())
    assert "py.typed" in project["tool"]["setuptools"]["package-data"]["earlyexit"]
    deps = [d.split(">")[0].split("=")[0] for d in project["project"]["dependencies"]]
    assert "safetensors" in deps and "tensorboard" not in deps
    assert any(d.startswith("tensorboard") for d in project["project"]["optional-dependencies"]["tensorboard"])
